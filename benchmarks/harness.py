"""What every harness here shares: the repository and tests/ (for the PyTorch reference) on sys.path,
and a timer that runs once to warm up (compile) before it measures."""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)


def timed(fn, iters: int) -> float:
    """Seconds per call of ``fn()`` over ``iters`` calls, after one warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters
