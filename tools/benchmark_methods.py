#!/usr/bin/env python
"""CoCoOp, KgCoOp, ProGrad, CLAP and LP++: time per training step and peak memory at several class
counts, beside the original code's computation; writes a JSON.

Example: python tools/benchmark_methods.py --output benchmarks/cpu-tiny-clip-methods-part1.json
See promptlearn/benchmark_methods.py for what each path does.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptlearn.benchmark_methods import MethodsBenchmarkSpec, run_methods_benchmark  # noqa: E402
from promptlearn.io import atomic_write_json  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = MethodsBenchmarkSpec()
    parser.add_argument("--model", default=default.model, help="open_clip model name (random weights)")
    parser.add_argument("--methods", nargs="+", default=default.methods)
    parser.add_argument("--classes", nargs="+", type=int, default=default.classes)
    parser.add_argument("--steps", type=int, default=default.steps, help="measured steps after one warm-up")
    parser.add_argument("--device", default=default.device)
    parser.add_argument("--output", default="output/benchmark-methods.json")
    args = parser.parse_args(argv)
    spec = MethodsBenchmarkSpec(model=args.model, methods=args.methods, classes=args.classes, steps=args.steps,
                                device=args.device)
    result = run_methods_benchmark(spec, log=lambda m: print(m, file=sys.stderr))
    atomic_write_json(args.output, result)
    print(f"{result['device']}; {spec.model} (random weights)")
    for row in result["results"]:
        ours, ratio = row["promptlearn"], row["step_time_ratio"]
        memory = row["step_memory_ratio"]
        against = f", reference / promptlearn: time {ratio:.1f}x" if ratio else ""
        against += f", step memory {memory:.2f}x" if memory else ""
        print(f"  {row['method']:7s} {row['classes']:5d} classes: {ours['time_per_step_s'] * 1e3:8.1f} ms/step, "
              f"step memory {ours['step_memory_mb']:.0f} MB{against}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
