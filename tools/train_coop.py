#!/usr/bin/env python
"""Few-shot CoOp with zero-shot CLIP and a linear probe alongside; see README.md and docs/.

The same as `promptlearn train`; kept so that every documented command still works."""
import sys

from promptlearn.commands import entry

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
