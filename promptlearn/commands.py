"""The `promptlearn` command (a console script, and `python -m promptlearn`):

    promptlearn train      few-shot runs: every listed method on one draw, one table
    promptlearn sweep      methods x datasets x shots x seeds, with CSV, summary and plots
    promptlearn inspect    a learned prompt read as its nearest vocabulary tokens
    promptlearn benchmark  speed and memory beside a loop faithful to the original code
    promptlearn benchmark-methods  CoCoOp, KgCoOp, ProGrad, CLAP, LP++: step time and memory by class count
    promptlearn benchmark-full-run  a whole ImageNet-sized CoOp run on synthetic images, timed end to end
    promptlearn list       methods | datasets | protocols | models | recipes [METHOD]

tools/*.py are shims onto these subcommands.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from promptlearn.cli import DefaultsHelp, add_console_arguments, add_run_arguments, prepare_run, run_tool, setup_logging
from promptlearn.errors import ConfigError, unknown_name_message


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------- train

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from promptlearn.data import DATASETS
    from promptlearn.methods import METHODS

    add_run_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    parser.add_argument("--eval-only", metavar="CKPT", help="evaluate a saved checkpoint (CoOp prompts), no training")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete run in --output-dir")
    from promptlearn.protocols import PROTOCOLS

    parser.epilog = (f"methods: {', '.join(METHODS)}. datasets: {', '.join(DATASETS)}. protocols (key protocol): "
                     f"{', '.join(PROTOCOLS)}. Details: promptlearn list methods|datasets|protocols|models.")


def train(args: argparse.Namespace) -> int:
    from promptlearn.runner import run_experiment

    cfg = prepare_run(args)  # None: --print-config printed it
    if cfg is not None:
        run_experiment(cfg, resume=args.resume, eval_only=args.eval_only, overwrite=args.overwrite)
    return 0


# ----------------------------------------------------------------------------- sweep

def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from promptlearn.launch import add_launch_arguments

    parser.add_argument("--config", required=True, metavar="SWEEP.yaml", help="sweep file (configs/sweeps/)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; rebuild the CSV, summary and plots from the finished runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides: run keys (train.epochs=5) or sweep keys (sweep.shots=[1,2])")
    add_console_arguments(parser)
    add_launch_arguments(parser)


def sweep(args: argparse.Namespace) -> int:
    from promptlearn.launch import launch_options
    from promptlearn.sweep import load_sweep, plan_runs, run_sweep

    setup_logging(args.verbose, args.quiet)
    launch = launch_options(args)
    spec, base, run_overrides = load_sweep(args.config, args.overrides)
    rows = run_sweep(spec, plan_runs(spec, base, run_overrides), report_only=args.report_only, launch=launch)
    if rows is None:
        return 0  # submitted to SLURM; --report-only builds the report once the runs have finished
    out = Path(spec.output_dir)
    print("\n" + (out / "summary.md").read_text(encoding="utf-8"))
    print(f"written: {out / 'results.csv'}, {out / 'summary.md'}" + (f", {out / 'plots'}/" if spec.plots else ""))
    return 0


# ----------------------------------------------------------------------------- inspect

def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    from promptlearn.config import CLASS_POSITIONS
    from promptlearn.decoder import METRICS

    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a promptlearn checkpoint.pt, or a reference CoOp prompt_learner/model.pth.tar-N")
    parser.add_argument("--topk", type=int, default=3, metavar="K",
                        help="nearest tokens per context vector (default 3)")
    parser.add_argument("--metric", choices=list(METRICS), default="euclidean",
                        help="euclidean (CoOp's reference method, default) or cosine (1 - cosine similarity)")
    parser.add_argument("--json", metavar="OUT", help="also write every context position's nearest tokens as JSON")
    parser.add_argument("--model", metavar="NAME",
                        help="open_clip model: required for reference CoOp checkpoints; overrides the recorded one")
    parser.add_argument("--pretrained", metavar="TAG|PATH|none",
                        help="its weights (reference checkpoints: default openai); overrides the recorded ones")
    parser.add_argument("--class-position", choices=CLASS_POSITIONS,
                        help="where the class name goes, for reference CoOp checkpoints (default end)")
    parser.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda or cuda:N")


def inspect(args: argparse.Namespace) -> int:
    from promptlearn.decoder import decode_checkpoint
    from promptlearn.io import atomic_write_json

    decoded = decode_checkpoint(args.checkpoint, topk=args.topk, metric=args.metric, model=args.model,
                                pretrained=args.pretrained, class_position=args.class_position, device=args.device)
    print(decoded.report())
    if args.json:
        atomic_write_json(args.json, decoded.to_json())
    return 0


# ----------------------------------------------------------------------------- benchmark

BENCHMARK_HELP = {
    "model": "open_clip model name", "pretrained": "open_clip tag, checkpoint path or none",
    "classes": "number of classes", "shots": "training images per class",
    "protocol": "dataset whose protocol epochs apply (imagenet: 50 at every K)",
    "epochs": "epochs of the extrapolated run (default: the protocol's)", "n_ctx": "context length M",
    "batch_size": "training batch size", "feature_passes": "promptlearn's cached augmented passes",
    "class_chunk": "promptlearn's classes per text-tower pass (0: all)", "device": "auto, cpu, cuda, cuda:N",
    "precision": "promptlearn's GPU precision (default bf16; the reference runs fp16)",
    "num_workers": "image-loading workers (default: 0 on the CPU, up to 8 on a GPU)",
    "reference_steps": "measured steps of the reference loop",
    "promptlearn_steps": "measured steps of promptlearn", "warmup_steps": "unmeasured first steps",
    "feature_sample": "images encoded to time feature extraction",
    "logit_images": "images whose logits the two paths compare",
    "class_names": "synthetic (two-word names) or imagenet (CLIP's real ImageNet names, the first N)"}


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    from promptlearn.benchmark import BenchmarkSpec

    for f in fields(BenchmarkSpec):
        if f.name in BENCHMARK_HELP:
            kind = int if f.type in ("int", "int | None") else str
            default = f" (default: {f.default})" if f.default is not None else ""
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                                help=BENCHMARK_HELP[f.name] + default)
    parser.add_argument("--quick", action="store_true",
                        help="few measured steps: under a minute for RN50 on 2 CPU cores")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="measure promptlearn alone (for class counts the reference loop cannot afford)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run promptlearn's steps eagerly on a GPU (train.cuda_graphs=false)")
    parser.add_argument("--output", default="output/benchmark.json", help="where the JSON goes")


def benchmark(args: argparse.Namespace) -> int:
    from promptlearn.benchmark import BenchmarkSpec, run_benchmark
    from promptlearn.io import atomic_write_json

    spec = BenchmarkSpec(reference=args.reference, cuda_graphs=args.cuda_graphs,
                         **{k: getattr(args, k) for k in BENCHMARK_HELP})
    if min(spec.classes, spec.shots, spec.reference_steps, spec.promptlearn_steps, spec.feature_sample) < 1:
        raise ConfigError("--classes, --shots, --*-steps and --feature-sample must be at least 1")
    result = run_benchmark(spec.quick_mode() if args.quick else spec, log=lambda m: print(m, file=sys.stderr))
    atomic_write_json(args.output, result)
    ref, ours = result["reference"], result["promptlearn"]
    print(f"{result['device']}; {spec.model} ({spec.pretrained}), {spec.classes} classes, {spec.shots} shots, "
          f"{result['epochs']} epochs x {result['steps_per_epoch']} steps")
    for name, path in (("reference", ref), ("promptlearn", ours)):
        if path:
            print(f"  {name:11s}: {path['time_per_step_s']:.3f} s/step, full run ~{path['full_run_s'] / 60:.1f} min, "
                  f"{path['memory_kind']} {path['peak_memory_mb']:.0f} MB")
    speedup = f"speed-up {result['speedup']:.1f}x, " if ref else ""
    text = f"text step {result['text_step_speedup']:.1f}x, " if ref else ""
    print(f"  {speedup}{text}largest logit difference {result['max_logit_difference']:.2e}")
    print(f"wrote {args.output}")
    return 0


def add_methods_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    from promptlearn.benchmark_methods import MethodsBenchmarkSpec

    default = MethodsBenchmarkSpec()
    parser.add_argument("--model", default=default.model, help="open_clip model name (random weights)")
    parser.add_argument("--methods", nargs="+", default=default.methods, help="methods to measure")
    parser.add_argument("--classes", nargs="+", type=int, default=default.classes, help="class counts")
    parser.add_argument("--steps", type=int, default=default.steps, help="measured steps after one warm-up")
    parser.add_argument("--device", default=default.device, help="cpu, cuda, cuda:N")
    parser.add_argument("--output", default="output/benchmark-methods.json", help="where the JSON goes")


def methods_benchmark(args: argparse.Namespace) -> int:
    from promptlearn.benchmark_methods import MethodsBenchmarkSpec, run_methods_benchmark
    from promptlearn.io import atomic_write_json
    from promptlearn.methods import method_class

    for name in args.methods:
        method_class(name)  # an unknown name stops here, with the nearest known one
    if args.steps < 1 or min(args.classes) < 1:
        raise ConfigError("--steps and every --classes value must be at least 1")
    spec = MethodsBenchmarkSpec(model=args.model, methods=args.methods, classes=args.classes, steps=args.steps,
                                device=args.device)
    result = run_methods_benchmark(spec, log=lambda m: print(m, file=sys.stderr))
    atomic_write_json(args.output, result)
    print(f"{result['device']}; {spec.model} (random weights)")
    for row in result["results"]:
        ours, ratio, memory = row["promptlearn"], row["step_time_ratio"], row["step_memory_ratio"]
        against = f", reference / promptlearn: time {ratio:.1f}x" if ratio else ""
        against += f", step memory {memory:.2f}x" if memory else ""
        print(f"  {row['method']:7s} {row['classes']:5d} classes: {ours['time_per_step_s'] * 1e3:8.1f} ms/step, "
              f"step memory {ours['step_memory_mb']:.0f} MB{against}")
    print(f"wrote {args.output}")
    return 0


# ----------------------------------------------------------------------------- list

LISTINGS = ("methods", "datasets", "protocols", "models", "recipes")


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=LISTINGS, help="what to list")
    parser.add_argument("method", nargs="?", help="recipes: only this method's published recipes")
    parser.add_argument("--filter", metavar="TEXT", help="models: only names containing TEXT")
    parser.add_argument("--parameters", action="store_true",
                        help="models: count each model's parameters (builds it on the meta device, ~0.5 s each)")
    parser.add_argument("--wide", action="store_true",
                        help="one line per row, however long (default: cells wrapped to the terminal's width)")


def listing(args: argparse.Namespace) -> int:
    if args.method is not None and args.what != "recipes":
        raise ConfigError(f"'promptlearn list {args.what}' takes no method name (got {args.method!r}); "
                          "only 'promptlearn list recipes METHOD' does")
    if args.what == "recipes":
        print(recipe_listing(args))
        return 0
    rows = {"methods": method_rows, "datasets": dataset_rows, "protocols": protocol_rows,
            "models": model_rows}[args.what](args)
    print(format_table(rows, width=None if args.wide else shutil.get_terminal_size((LIST_WIDTH, 24)).columns))
    return 0


def recipe_listing(args: argparse.Namespace) -> str:
    from promptlearn.recipes import all_recipes, recipe_table, recipes_for

    recipes = recipes_for(args.method) if args.method else [r for rs in all_recipes().values() for r in rs]
    return recipe_table(recipes, 10**6 if args.wide else shutil.get_terminal_size((LIST_WIDTH, 24)).columns)


def method_rows(args: argparse.Namespace) -> list[dict]:
    from promptlearn.config import RunConfig
    from promptlearn.methods import METHODS

    cfg = RunConfig()
    return [{"method": name, "config section": cls.section or "-",
             "capabilities": cls.capabilities_for(cfg).describe()} for name, cls in METHODS.items()]


def dataset_rows(args: argparse.Namespace) -> list[dict]:
    from promptlearn.data import DATASETS

    return [{"dataset": name, "zero-shot template": info.template,
             "epochs": str(info.epochs) if info.epochs else "by shots",
             "use": "test only" if info.evaluation_only else "train + test", "layout under data.root": info.layout}
            for name, info in DATASETS.items()]


def protocol_rows(args: argparse.Namespace) -> list[dict]:
    from promptlearn.protocols import PROTOCOLS

    return [{"protocol": name, "what it fixes": protocol.summary,
             "default targets": ", ".join(protocol.default_targets) or "-"} for name, protocol in PROTOCOLS.items()]


def model_rows(args: argparse.Namespace) -> list[dict]:
    import open_clip

    from promptlearn.backbone import model_listing

    names = [n for n in open_clip.list_models() if not args.filter or args.filter.lower() in n.lower()]
    rows = model_listing(names, parameters=args.parameters) if names else []
    return [{"model": r["model"], "vision": r["vision"], "text": r["text"], "embed dim": str(r["embed_dim"] or "?"),
             **({"parameters (M)": f"{r['parameters'] / 1e6:.1f}" if r["parameters"] else "?"} if args.parameters
                else {}),
             "pretrained tags": ", ".join(r["tags"]) or "none (random init or a local checkpoint)",
             "weights in the local cache": ", ".join(r["cached_tags"]) or "-"} for r in rows]


LIST_WIDTH = 100  # characters a listing fills where stdout is not a terminal (COLUMNS sets another)
NARROWEST_COLUMN = 8


def format_table(rows: list[dict], width: int | None = None) -> str:
    """Rows as aligned columns; with `width`, cells are wrapped so that no line is longer, a row's continuation
    lines below it. The first column (the name) is kept whole; of the others the widest gives way first, at
    spaces while it can, then within words (down to NARROWEST_COLUMN characters)."""
    if not rows:
        return "(nothing to list)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    longest_word = {c: max(len(w) for r in [dict(zip(columns, columns)), *rows] for w in r[c].split() or [""])
                    for c in columns}
    while width and sum(widths.values()) + 2 * (len(columns) - 1) > width:
        wrappable = [c for c in columns[1:] if widths[c] > longest_word[c]] or \
            [c for c in columns[1:] if widths[c] > NARROWEST_COLUMN]
        if not wrappable:
            break
        widths[max(wrappable, key=widths.get)] -= 1

    def lines_of(cells: dict) -> list[str]:
        wrapped = {c: textwrap.wrap(cells[c], widths[c], break_on_hyphens=False) or [""] for c in columns}
        return ["  ".join((wrapped[c][i] if i < len(wrapped[c]) else "").ljust(widths[c]) for c in columns).rstrip()
                for i in range(max(map(len, wrapped.values())))]

    return "\n".join([*lines_of({c: c for c in columns}), "  ".join("-" * widths[c] for c in columns),
                      *(line for r in rows for line in lines_of(r))])


def add_full_run_arguments(parser: argparse.ArgumentParser) -> None:
    from promptlearn.full_run import FullRunSpec

    spec = FullRunSpec()
    parser.add_argument("--model", default=spec.model, help="open_clip model name")
    parser.add_argument("--pretrained", default=spec.pretrained, help="open_clip tag, checkpoint path or none")
    for name, help_text in (("classes", "ImageNet classes (the first N real names)"),
                            ("shots", "training images per class"),
                            ("train_per_class", "images per class folder of the training split"),
                            ("test_per_class", "images per class folder of the test split"),
                            ("num_workers", "image-loading workers (default: one per CPU core but one)"),
                            ("epochs", "epochs (default: the protocol's, 50)")):
        default = getattr(spec, name)
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default,
                            help=help_text + (f" (default: {default})" if default is not None else ""))
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run every step eagerly (train.cuda_graphs=false)")
    parser.add_argument("--beside", help="a `promptlearn benchmark` JSON of the same class count, for the "
                                         "reference loop's figures")
    parser.add_argument("--work-dir", help="where the dataset and the run go (default: a temporary folder)")
    parser.add_argument("--output", default="output/benchmark-full-run.json", help="where the JSON goes")


def full_run(args: argparse.Namespace) -> int:
    import tempfile

    from promptlearn.full_run import FullRunSpec, run_full
    from promptlearn.io import atomic_write_json

    spec = FullRunSpec(model=args.model, pretrained=args.pretrained, classes=args.classes, shots=args.shots,
                       train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                       num_workers=args.num_workers, cuda_graphs=args.cuda_graphs, epochs=args.epochs)
    if spec.train_per_class < spec.shots + 1:
        raise ConfigError(f"--train-per-class must exceed --shots ({spec.shots}): validation is drawn from the rest")
    beside = json.loads(Path(args.beside).read_text()) if args.beside else None
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        result = run_full(spec, Path(work), beside)
    atomic_write_json(args.output, result)
    print(f"{result['device']}; {spec.model}, {spec.classes} ImageNet classes, {spec.shots} shots, "
          f"{result['epochs']} epochs, {result['total_steps']} steps: the whole run took {result['run_wall_s']:.0f} s "
          f"({result['time_per_step_s'] * 1e3:.2f} ms per training step)")
    print(f"wrote {args.output}")
    return 0


# ----------------------------------------------------------------------------- entry

COMMANDS = {
    "train": Command("few-shot run: every listed method on one draw", add_train_arguments, train),
    "sweep": Command("methods x datasets x shots x seeds, then CSV, summary and plots", add_sweep_arguments, sweep),
    "inspect": Command("read a learned prompt as its nearest vocabulary tokens", add_inspect_arguments, inspect),
    "benchmark": Command("speed and memory beside a loop faithful to the original code", add_benchmark_arguments,
                         benchmark),
    "benchmark-methods": Command("CoCoOp, KgCoOp, ProGrad, CLAP, LP++: step time and memory at several class "
                                 "counts beside the original computation", add_methods_benchmark_arguments,
                                 methods_benchmark),
    "benchmark-full-run": Command("a whole ImageNet-sized CoOp run on synthetic images, timed end to end",
                                  add_full_run_arguments, full_run),
    "list": Command("list methods, datasets, protocols, models or published recipes", add_list_arguments, listing),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: promptlearn COMMAND [options]\n\ncommands:\n" + "\n".join(
        f"  {name.ljust(width)}  {c.help}" for name, c in COMMANDS.items()) + \
        "\n\n'promptlearn COMMAND --help' shows a command's options."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise ConfigError(unknown_name_message("command", name, COMMANDS))
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"promptlearn {name}", description=command.help, formatter_class=DefaultsHelp)
    command.add_arguments(parser)
    return command.run(parser.parse_intermixed_args(rest))  # flags and key=value in any order


def entry(argv: list[str] | None = None) -> None:
    """The console script: one clear error line and exit status 2 for any user error."""
    run_tool(lambda _: main(argv))
