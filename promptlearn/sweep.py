"""Few-shot sweeps: methods x datasets x shots x seeds, one run folder per (dataset, shots, seed)
holding every method of the sweep (they share the draw and the cached features), then one table
(results.csv), a Markdown summary (mean +- std over seeds) and plots of accuracy against shots.

A sweep YAML has a `sweep:` section (SweepConfig) beside the ordinary run keys, which every run
starts from. Per run the layers are: defaults, the sweep file's run keys, the dataset's YAML,
command-line overrides, then the run's shots, seed and folder.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from promptlearn.cli import dataset_config
from promptlearn.config import (
    NEUTRAL_KEYS,
    RunConfig,
    build_config,
    load_config,
    parse_override,
    read_sources,
    saved_changes,
)
from promptlearn.data import build_dataset
from promptlearn.errors import ConfigError, PromptlearnError, RunBusy, RunsLeft
from promptlearn.io import atomic_write_text, spreadsheet_safe
from promptlearn.launch import LaunchOptions, execute
from promptlearn.progress import progress
from promptlearn.protocols import PROTOCOLS, SELECTION_TEXT, Protocol, protocol_for
from promptlearn.report import cell_text, mean_std, method_values, protocol_summary, seeds_text
from promptlearn.runner import is_complete, run_experiment

log = logging.getLogger("promptlearn")

CSV_COLUMNS = ["method", "dataset", "backbone", "pretrained", "protocol", "selection", "shots", "seed", "accuracy",
               "macro_f1", "ece", "base_accuracy", "novel_accuracy", "hm", "targets_average", "train_seconds", "na",
               "run_dir"]
# settings that do not change a run's results: a finished run made under other values is still reused
# run keys the sweep itself sets for every run
SWEEP_SET_KEYS = {"data.shots": "sweep.shots", "data.seed": "sweep.seeds", "output_dir": "sweep.output_dir"}


@dataclass
class SweepConfig:
    datasets: list[str] = field(default_factory=list)  # registered dataset names or dataset YAML files
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    output_dir: str = "output/sweep"
    plots: bool = True  # PNG plots (needs matplotlib: pip install 'promptlearn[plot]')


@dataclass
class PlannedRun:
    dataset: str  # the dataset's own name, as its reader gives it
    shots: int
    seed: int
    cfg: RunConfig

    @property
    def folder(self) -> Path:
        return Path(self.cfg.output_dir)


# ----------------------------------------------------------------------------- configuration

def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, RunConfig, list[str]]:
    """The sweep settings, the run config every run starts from, and the run-key overrides
    (applied again after each dataset's YAML so that the command line wins)."""
    layers = read_sources([path], overrides)
    if not any(key.startswith("sweep.") for key in layers[0][1]):
        raise ConfigError(f"{path}: a sweep file needs a `sweep:` section with datasets, shots, seeds and output_dir")
    for key, sweep_key in SWEEP_SET_KEYS.items():
        if any(key in flat for _, flat in layers):
            raise ConfigError(f"{path}: {key} is set by the sweep for each run; use {sweep_key} instead")
    sweep = SweepConfig()
    base = build_config(layers, extra={"sweep": sweep})  # names, types and values, before any work
    check_sweep(sweep, str(path))
    return sweep, base, [text for text in overrides if not parse_override(text)[0].startswith("sweep.")]


def check_sweep(sweep: SweepConfig, source: str) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {message}")

    need(bool(sweep.datasets), "sweep.datasets must list at least one dataset name or dataset YAML")
    need(bool(sweep.shots) and min(sweep.shots) >= 1, f"sweep.shots must be positive integers, got {sweep.shots}")
    need(bool(sweep.seeds), "sweep.seeds must list at least one seed")
    for key in ("datasets", "shots", "seeds"):
        values = getattr(sweep, key)
        need(len(set(values)) == len(values), f"sweep.{key} lists a value twice: {values}")


def plan_runs(sweep: SweepConfig, base: RunConfig, run_overrides: list[str]) -> list[PlannedRun]:
    """Every (dataset, shots, seed) run with its full config. Each dataset is read once here, so a
    missing dataset stops the sweep before any long work."""
    out = Path(sweep.output_dir)
    runs, seen = [], {}
    for entry in progress(sweep.datasets, desc="checking datasets", leave=False):
        files, extra = dataset_config(entry)
        dataset_cfg = load_config(files, extra + list(run_overrides), base=copy.deepcopy(base))
        name = build_dataset(dataset_cfg.data).name
        if name in seen:
            raise ConfigError(f"sweep.datasets: {entry!r} and {seen[name]!r} are both the dataset {name!r}; "
                              "list each dataset once")
        seen[name] = entry
        for shots in sweep.shots:
            for seed in sweep.seeds:
                folder = out / name / f"{shots}-shot" / f"seed-{seed}"
                cfg = load_config([], [f"data.shots={shots}", f"data.seed={seed}", f"output_dir={folder}"],
                                  base=copy.deepcopy(dataset_cfg))
                runs.append(PlannedRun(name, shots, seed, cfg))
    return runs


# ----------------------------------------------------------------------------- running

def setup_changes(run: PlannedRun) -> list[str]:
    """Settings in which the run folder's saved config differs from the planned run (result-changing keys only)."""
    saved_file = run.folder / "config.yaml"
    return saved_changes(saved_file, run.cfg, NEUTRAL_KEYS) if saved_file.is_file() else []


def saved_metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_finished(run: PlannedRun) -> bool:
    """Complete, and holding every method of the sweep (methods added later make it unfinished)."""
    return is_complete(run.folder) and set(run.cfg.methods) <= set(saved_metrics(run.folder))


def run_sweep(sweep: SweepConfig, runs: list[PlannedRun], report_only: bool = False,
              launch: LaunchOptions | None = None) -> list[dict] | None:
    """Run what is not finished (resuming unfinished runs), here one after another or as `launch` says
    (local processes, a SLURM array), then write the CSV, summary and plots and return the rows; None
    when the runs were submitted to SLURM without waiting (no report yet). Runs that another process is
    using are left and the others done; after the report, a PromptlearnError names the runs that failed,
    or RunsLeft (exit status 3) the runs that were left."""
    if sweep.plots:
        from promptlearn.plots import require_matplotlib
        require_matplotlib()  # before hours of runs, not after
    conflicts = [(run, setup_changes(run)) for run in runs]
    conflicts = [(run, changes) for run, changes in conflicts if changes]
    if conflicts:
        run, changes = conflicts[0]
        raise ConfigError(f"{len(conflicts)} run folder(s) hold runs made with other settings, e.g. {run.folder} "
                          f"({'; '.join(changes[:3])}); use another sweep.output_dir, or delete those folders "
                          "to redo them")
    failed, busy, ended = [], [], True
    if not report_only:
        todo = [run for run in runs if not is_finished(run)]
        log.info("sweep: %d runs, %d finished, %d to run", len(runs), len(runs) - len(todo), len(todo))
        if launch is not None and launch.parallel:
            failed, busy, ended = execute(todo, launch, Path(sweep.output_dir))
        else:
            busy = run_serially(todo)
    if not ended:
        return None
    rows = collect_rows(runs)
    write_report(sweep, runs, rows)
    if failed or busy:
        raise runs_left_error(failed, busy, len(runs), Path(sweep.output_dir))
    return rows


def run_label(run: PlannedRun) -> str:
    return f"{run.dataset}, {run.shots} shots, seed {run.seed}"


def runs_left_error(failed: list[tuple[PlannedRun, str]], busy: list[PlannedRun], total: int,
                    output_dir: Path) -> PromptlearnError:
    """What the sweep did not do, once the report of the rest is written: failed runs are an error (exit
    status 2), runs that other processes were using only mean the sweep is not complete yet (3)."""
    parts = []
    if failed:
        run, error = failed[0]
        parts.append(f"{len(failed)} sweep run(s) failed twice and are left out of the report, e.g. {run_label(run)}: "
                     f"{error.splitlines()[0]} (see {output_dir / 'logs'})")
    if busy:
        parts.append(f"{len(busy)} of {total} sweep run(s) were left because another promptlearn process is using "
                     f"their folders: " + "; ".join(f"{run_label(run)} ({run.folder})" for run in busy[:5])
                     + (f"; and {len(busy) - 5} more" if len(busy) > 5 else ""))
    message = ". ".join(parts) + (". Running the same sweep command again retries them" if failed else
                                  ". Run the same sweep command again once those processes have ended") + \
        " (finished runs are skipped)."
    return PromptlearnError(message) if failed else RunsLeft(message)


def run_serially(todo: list[PlannedRun]) -> list[PlannedRun]:
    """Run `todo` one after another; returns the runs left because another process holds their folder."""
    busy = []
    for run in progress(todo, desc="sweep"):
        log.info("sweep: %s -> %s", run_label(run), run.folder)
        try:
            run_experiment(run.cfg, resume=True)
        except RunBusy as e:
            log.warning("sweep: skipping %s: %s", run_label(run), e)
            busy.append(run)
        except PromptlearnError as e:
            raise PromptlearnError(f"sweep run {run_label(run)}: {e} Running the same sweep command again skips "
                                   "finished runs and resumes this one.") from None
    return busy


# ----------------------------------------------------------------------------- results

def collect_rows(runs: list[PlannedRun]) -> list[dict]:
    """One row per method of every finished run; unfinished runs are left out (with a warning)."""
    rows, missing = [], 0
    for run in runs:
        if not is_complete(run.folder):
            missing += 1
            continue
        metrics = saved_metrics(run.folder)
        for method in run.cfg.methods:
            if method not in metrics:
                continue
            m = metrics[method]
            rows.append({"method": method, "dataset": run.dataset, "backbone": run.cfg.backbone.model,
                         "pretrained": run.cfg.backbone.pretrained, "protocol": run.cfg.protocol,
                         "selection": run.cfg.selection, "shots": run.shots, "seed": run.seed,
                         **{key: m.get(key) for key in ("accuracy", "macro_f1", "ece", "base_accuracy",
                                                        "novel_accuracy", "hm", "targets_average")},
                         "train_seconds": m.get("train_seconds", 0.0),
                         "na": "; ".join(f"{where}: {why}" for where, why in (m.get("na") or {}).items()),
                         "target_accuracy": m.get("target_accuracy") or {}, "recipe": m.get("recipe"),
                         "run_dir": str(run.folder)})
    if missing:
        log.warning("sweep: %d of %d runs are not finished and are left out of the report", missing, len(runs))
    return rows


# (method, shots) -> (mean, std, number of seeds)
Curve = dict[tuple[str, int], tuple[float, float, int]]


def dataset_curves(rows: list[dict]) -> dict[str, Curve]:
    """Per dataset: accuracy mean +- std over seeds for each method and shot count."""
    by_key: dict[tuple[str, str, int], list[float]] = {}
    for r in rows:
        if r["accuracy"] is not None:  # n/a (e.g. a method that needs validation under selection=none)
            by_key.setdefault((r["dataset"], r["method"], r["shots"]), []).append(r["accuracy"])
    curves: dict[str, Curve] = {}
    for (dataset, method, shots), values in by_key.items():
        curves.setdefault(dataset, {})[(method, shots)] = mean_std(values)
    return curves


def average_curve(rows: list[dict], datasets: list[str]) -> Curve:
    """Accuracy averaged over the datasets per seed, then mean +- std over the seeds that every dataset has."""
    per_seed: dict[tuple[str, int, int], dict[str, float]] = {}
    for r in rows:
        if r["accuracy"] is not None:
            per_seed.setdefault((r["method"], r["shots"], r["seed"]), {})[r["dataset"]] = r["accuracy"]
    averages: dict[tuple[str, int], list[float]] = {}
    for (method, shots, _), accs in per_seed.items():
        if all(d in accs for d in datasets):
            averages.setdefault((method, shots), []).append(statistics.fmean(accs[d] for d in datasets))
    return {key: mean_std(values) for key, values in averages.items()}


def results_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else spreadsheet_safe(v) for k, v in r.items()})
    return buf.getvalue()


def curve_table(curve: Curve, methods: list[str], shots: list[int]) -> str:
    lines = ["| method | " + " | ".join(f"{k} shot{'s' * (k > 1)}" for k in shots) + " |",
             "|---|" + "---:|" * len(shots)]
    for method in methods:
        cells = [cell_text(curve[(method, k)]) if (method, k) in curve else "–" for k in shots]
        if any(c != "–" for c in cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def methods_and_datasets(runs: list[PlannedRun]) -> tuple[list[str], list[str]]:
    """The sweep's methods and datasets, in the order the sweep file lists them."""
    return (list(dict.fromkeys(m for run in runs for m in run.cfg.methods)),
            list(dict.fromkeys(run.dataset for run in runs)))


def summary_markdown(sweep: SweepConfig, runs: list[PlannedRun], rows: list[dict]) -> str:
    methods, datasets = methods_and_datasets(runs)
    shots = sorted(sweep.shots)
    backbones = sorted({f"{r['backbone']} ({r['pretrained']})" for r in rows}) or ["-"]
    finished = len({r["run_dir"] for r in rows})
    lines = ["# Few-shot sweep: test accuracy (%)", "",
             f"Backbone {', '.join(backbones)}; {seeds_text(sweep.seeds)}; {finished} of {len(runs)} runs "
             "finished. "
             f"Model selection: {SELECTION_TEXT[runs[0].cfg.selection if runs else 'validation']} (linear-probe C, "
             "Tip-Adapter alpha and beta); the test split is used only for these numbers.", ""]
    lines += [f"## Average over {len(datasets)} dataset{'s' * (len(datasets) > 1)}", "",
              "Per seed, the accuracy averaged over the datasets; then mean ± std over seeds.", "",
              curve_table(average_curve(rows, datasets), methods, shots), ""]
    curves = dataset_curves(rows)
    for dataset in datasets:
        lines += [f"## {dataset}", "", curve_table(curves.get(dataset, {}), methods, shots), ""]
    return "\n".join(lines)


def write_report(sweep: SweepConfig, runs: list[PlannedRun], rows: list[dict]) -> None:
    out = Path(sweep.output_dir)
    atomic_write_text(out / "results.csv", results_csv(rows))
    protocol = protocol_for(runs[0].cfg) if runs else PROTOCOLS.get("fewshot")
    if protocol.name != "fewshot":  # the paper's layout: base / novel / HM, or source / targets / average
        methods, datasets = methods_and_datasets(runs)
        summary = protocol_summary(protocol, rows, methods, datasets, sweep.seeds, runs[0].cfg)
    else:
        summary = summary_markdown(sweep, runs, rows)
    atomic_write_text(out / "summary.md", summary)
    written = [out / "results.csv", out / "summary.md"]
    if sweep.plots and rows:
        written += write_plots(sweep, runs, rows, protocol)
    log.info("sweep report: %s", ", ".join(map(str, written)))


def write_plots(sweep: SweepConfig, runs: list[PlannedRun], rows: list[dict], protocol: Protocol) -> list[Path]:
    """The protocol's figures in the papers' layout: accuracy against shots (few-shot); base against novel
    and base / novel / HM bars (base-to-novel); accuracy per test set (cross-dataset, domain generalisation)."""
    from promptlearn import plots

    out, cfg = Path(sweep.output_dir) / "plots", runs[0].cfg
    methods, datasets = methods_and_datasets(runs)
    backbone = f"{cfg.backbone.model} ({cfg.backbone.pretrained})"
    over = f"average over {len(datasets)} datasets" if len(datasets) > 1 else datasets[0]
    written = []
    if protocol.name == "fewshot":
        panels = {"average": (f"average over {len(datasets)} dataset{'s' * (len(datasets) > 1)}",
                              average_curve(rows, datasets))}
        panels.update({d: (d, c) for d, c in dataset_curves(rows).items()})
        for slug, (title, curve) in panels.items():
            written.append(out / f"accuracy_{slug}.png")
            plots.accuracy_plot(written[-1], f"{title}, {backbone}", curve, methods)
        return written
    columns, values = method_values(protocol, rows, methods, datasets)
    title = f"{protocol.name}, {over}, {backbone}, {cfg.data.shots} shots"
    if protocol.name == "base2novel":
        written.append(out / "base_novel.png")
        plots.base_novel_plot(written[-1], values, title)
        written.append(out / "base_novel_bars.png")
        parts = ["base", "novel", "HM"]
        plots.grouped_bars(written[-1], title, list(values), parts,
                           {(m, c): v[c] for m, v in values.items() for c in parts if c in v},
                           {c: {"color": colour, "hatch": hatch} for c, colour, hatch
                            in zip(parts, ("#1f77b4", "#ff7f0e", "#555555"), ("", "//", ".."))})
    elif protocol.default_targets:  # cross-dataset, domain generalisation: each test set, one bar per method
        written.append(out / "targets.png")
        names = {"source": f"source ({over})", "average": "targets average"}
        plots.grouped_bars(written[-1], title, [names.get(c, c) for c in columns], list(values),
                           {(names.get(c, c), m): v[c] for m, v in values.items() for c in columns if c in v},
                           plots.method_styles(methods))
    return written
