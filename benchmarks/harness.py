"""What every harness here shares: the repository on sys.path (for ``tests.support``: the PyTorch reference, the
Cloud Storage server),
argparse types that turn a bad option value into argparse's one-line usage error, ``run_main``, which
reports bad input found later (a missing file, a bad config) as one line too, and the timers, which run
once to warm up (compile) before they measure."""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _number(convert, in_range, expected: str):
    """An argparse type: ``convert(text)`` within ``in_range``; anything else is argparse's one-line usage error
    "expected <expected>, got <text>", not a traceback."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not in_range(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected  # argparse names the type by it in its own messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
sample_rate = _number(float, lambda v: 0 < v <= 1, "a sample rate 0 < r <= 1")  # a Partial FC rate; refuses nan


def arch_name(text: str) -> str:
    """argparse type: a backbone name of the model zoo (ir_18 ... ir_se_200)."""
    from adaface_jax.models.iresnet import ARCHS  # noqa: PLC0415  (imports flax: only when parsing)

    if text not in ARCHS:
        raise argparse.ArgumentTypeError(f"unknown arch {text!r}; expected one of {', '.join(sorted(ARCHS))}")
    return text


def run_main(main) -> None:
    """Run ``main()`` and exit with its status; bad input it finds later (``adaface_jax.cli.expected_errors``:
    a missing or corrupt file, a bad config) ends in one line on stderr and status 1, as ``adaface-jax``
    reports it, with the command's environment for TensorFlow's logs. Anything else is a bug and keeps its
    traceback."""
    from adaface_jax.cli import expected_errors, quiet_native_logs  # noqa: PLC0415
    from adaface_jax.errors import one_line  # noqa: PLC0415

    quiet_native_logs()  # TensorFlow's start-up notices, as for the command
    try:
        status = main()
    except expected_errors() as exc:
        print(f"{os.path.basename(sys.argv[0])}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(int(status or 0))


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
