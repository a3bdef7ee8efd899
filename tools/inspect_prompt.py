#!/usr/bin/env python
"""Read a learned CoOp context as words: the nearest vocabulary tokens of every context vector.

Decodes promptlearn checkpoints (their backbone is recorded in them) and reference CoOp checkpoints
(a state dict with `ctx`; name their backbone with --model and --pretrained). See README.md.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptlearn.cli import run_tool  # noqa: E402
from promptlearn.config import CLASS_POSITIONS  # noqa: E402
from promptlearn.decoder import METRICS, decode_checkpoint  # noqa: E402
from promptlearn.io import atomic_write_json  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a promptlearn checkpoint.pt, or a reference CoOp prompt_learner/model.pth.tar-N")
    parser.add_argument("--topk", type=int, default=3, metavar="K", help="nearest tokens per context vector (default 3)")
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
    args = parser.parse_args(argv)
    decoded = decode_checkpoint(args.checkpoint, topk=args.topk, metric=args.metric, model=args.model,
                                pretrained=args.pretrained, class_position=args.class_position, device=args.device)
    print(decoded.report())
    if args.json:
        atomic_write_json(args.json, decoded.to_json())
    return 0


if __name__ == "__main__":
    run_tool(main)
