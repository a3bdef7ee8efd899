#!/usr/bin/env python
"""CoOp's speed and memory: promptlearn beside a loop faithful to the reference recipe; writes a JSON.

Example: python tools/benchmark.py --class-names imagenet --classes 10 --output benchmarks/bench.json
See promptlearn/benchmark.py for what each path does and docs/performance.md for results.

The same as `promptlearn benchmark`; kept so that every documented command still works."""
import sys

from promptlearn.commands import entry

if __name__ == "__main__":
    entry(["benchmark", *sys.argv[1:]])
