#!/usr/bin/env python
"""Few-shot sweep: methods x datasets x shots x seeds, then results.csv, summary.md and plots; see README.md.

A rerun skips finished runs and resumes unfinished ones."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptlearn.cli import run_tool  # noqa: E402
from promptlearn.sweep import load_sweep, plan_runs, run_sweep  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, metavar="SWEEP.yaml", help="sweep file (configs/sweeps/)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; rebuild the CSV, summary and plots from the finished runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides: run keys (train.epochs=5) or sweep keys (sweep.shots=[1,2])")
    args = parser.parse_intermixed_args(argv)  # flags and key=value in any order
    sweep, base, run_overrides = load_sweep(args.config, args.overrides)
    run_sweep(sweep, plan_runs(sweep, base, run_overrides), report_only=args.report_only)
    out = Path(sweep.output_dir)
    print("\n" + (out / "summary.md").read_text(encoding="utf-8"))
    print(f"written: {out / 'results.csv'}, {out / 'summary.md'}" + (f", {out / 'plots'}/" if sweep.plots else ""))
    return 0


if __name__ == "__main__":
    run_tool(main)
