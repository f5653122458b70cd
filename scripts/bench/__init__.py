"""The benchmarks that `python scripts/bench.py NAME` runs, a module each (`torch`'s is `pytorch`).

A benchmark module has CONFIG (its default config file), SETTINGS (its full settings), QUICK (what
--quick changes), `run(args, settings) -> (columns, rows, summary)` and, where it measures in a fresh
process, `worker(**params) -> rows`. Shared: `common` (trunk modes, sanity checks, timing, worker
processes, JSON and Markdown output), `flops` (the FLOP model and XLA's count), `stage` (one stage's
train step, built and timed).
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)   # the package of this tree, installed or not
