#!/usr/bin/env python
"""CoOp's speed and memory: promptlearn beside a loop faithful to the reference recipe; writes a JSON.

Example: python tools/benchmark.py --quick --output benchmarks/cpu-rn50-quick.json
See promptlearn/benchmark.py for what each path does and README.md ("Performance") for results.
"""
import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptlearn.benchmark import BenchmarkSpec, run_benchmark  # noqa: E402
from promptlearn.cli import run_tool  # noqa: E402
from promptlearn.errors import ConfigError  # noqa: E402
from promptlearn.io import atomic_write_json  # noqa: E402

HELP = {"model": "open_clip model name", "pretrained": "open_clip tag, checkpoint path or none",
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
        "logit_images": "images whose logits the two paths compare"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(BenchmarkSpec):
        if f.name in HELP:
            kind = int if f.type in ("int", "int | None") else str
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                                help=HELP[f.name] + (f" (default: {f.default})" if f.default is not None else ""))
    parser.add_argument("--quick", action="store_true",
                        help="few measured steps: under a minute for RN50 on 2 CPU cores")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="measure promptlearn alone (for class counts the reference loop cannot afford)")
    parser.add_argument("--output", default="output/benchmark.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    spec = BenchmarkSpec(reference=args.reference, **{k: getattr(args, k) for k in HELP})
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
    print(f"  {speedup}largest logit difference {result['max_logit_difference']:.2e}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    run_tool(main)
