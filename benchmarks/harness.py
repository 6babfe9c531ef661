"""What every harness here shares: the repository and tests/ (for the PyTorch reference) on sys.path,
and the timers, which run once to warm up (compile) before they measure."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is argparse's one-line usage error, not a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def timed(fn, iters: int) -> float:
    """Seconds per call of ``fn()`` over ``iters`` calls, after one warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def timed_median(fn, iters: int) -> float:
    """Median seconds of one call of ``fn()`` over ``iters`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
