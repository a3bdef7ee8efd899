#!/usr/bin/env python
"""Few-shot sweep: methods x datasets x shots x seeds, then results.csv, summary.md and plots; see README.md.

A rerun skips finished runs and resumes unfinished ones.

The same as `promptlearn sweep`; kept so that every documented command still works."""
import sys

from promptlearn.commands import entry

if __name__ == "__main__":
    entry(["sweep", *sys.argv[1:]])
