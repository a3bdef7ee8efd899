#!/usr/bin/env python
"""Few-shot CoOp with zero-shot CLIP and a linear probe alongside; see README.md."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptlearn.cli import add_run_arguments, config_from_args, run_tool  # noqa: E402
from promptlearn.runner import run_experiment  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    parser.add_argument("--eval-only", metavar="CKPT", help="evaluate a saved CoOp checkpoint, no training")
    args = parser.parse_intermixed_args(argv)  # flags and key=value in any order
    run_experiment(config_from_args(args), resume=args.resume, eval_only=args.eval_only)
    return 0


if __name__ == "__main__":
    run_tool(main)
