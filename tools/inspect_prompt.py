#!/usr/bin/env python
"""Read a learned CoOp context as words: the nearest vocabulary tokens of every context vector.

Decodes promptlearn checkpoints (their backbone is recorded in them) and reference CoOp checkpoints
(a state dict with `ctx`; name their backbone with --model and --pretrained). See README.md.

The same as `promptlearn inspect`; kept so that every documented command still works."""
import sys

from promptlearn.commands import entry

if __name__ == "__main__":
    entry(["inspect", *sys.argv[1:]])
