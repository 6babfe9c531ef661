"""What every harness here shares: the repository and tests/ (for the PyTorch reference) on sys.path,
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


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def sample_rate(text: str) -> float:
    """argparse type: a Partial FC sample rate, 0 < r <= 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a sample rate 0 < r <= 1, got {text!r}") from None
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a sample rate 0 < r <= 1, got {text}")
    return value


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
