"""Helpers for tests that drive `adaface-jax` as a user would: training subprocesses, waiting on
what a run writes (checkpoints, log lines) rather than on time, and signalling a run safely."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from adaface_jax.cli import main
from tests.support import REPO as REPO_ROOT

REPO = str(REPO_ROOT)
# `adaface-jax ...` in a fresh interpreter, through the stable entry point adaface_jax.cli.main.
CLI = [sys.executable, "-c", "import sys; from adaface_jax.cli import main; sys.exit(main(sys.argv[1:]))"]
SCHEME_FOLDERS = ("gs:", "s4:")  # what a path layer that mistook a URL for a local path would create


def slowed_cli(delay_s: float) -> list[str]:
    """`adaface-jax ...` whose training loop sleeps ``delay_s`` after each step (``train``'s ``after_step`` hook),
    so a test can signal a run in the middle; nothing depends on the timing."""
    if not delay_s:
        return CLI
    code = ("import functools, sys, time; from adaface_jax.train import loop; "
            f"loop.train = functools.partial(loop.train, after_step=lambda step: time.sleep({float(delay_s)!r})); "
            "from adaface_jax.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code]


def train_cmd(workdir, total_steps, *, data_dir=None, every_steps=2, delay=0.0, extra=()):
    """`adaface-jax train` on the tiny backbone: a TFRecord dataset (``data_dir``) or, without one, the
    random source with an epoch far longer than any test (no epoch-end checkpoints)."""
    data = ([f"--config.data.data_dir={data_dir}"] if data_dir else
            ["--config.data.source=random", "--config.data.num_images=8000000", "--config.data.image_size=16"])
    return [*slowed_cli(delay), "train", "--config",
            os.path.join(REPO, "configs", "cpu_synthetic.py"), "--workdir", str(workdir), *data,
            "--config.model.arch=tiny", "--config.model.embedding_size=16", "--config.num_classes=8",
            "--config.global_batch_size=8", f"--config.total_steps={total_steps}",
            f"--config.checkpoint.every_steps={every_steps}", "--config.evals.verification.every_epochs=0", "--config.log_every=1",
            "--config.progress=false", "--config.sample_grid=false", *extra]


def subprocess_env(ndev=4):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={ndev}", PYTHONPATH=REPO,
                CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")


def start(cmd, ndev=4):
    return subprocess.Popen(cmd, env=subprocess_env(ndev), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _stderr_tail(proc):
    if proc.poll() is None:
        return "(still running)"
    try:
        return proc.stderr.read()[-3000:]
    except (ValueError, OSError):
        return ""


def wait_until(proc, condition, what, timeout=300.0):
    """Poll ``condition()`` until it holds while ``proc`` runs; fail (naming ``what``) if the run ends first
    or after ``timeout`` seconds (generous: the machine is shared)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}: {_stderr_tail(proc)}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def signal_running(proc, signum):
    """Send ``signum`` only to a process that has not been reaped (Popen.send_signal polls first, so the
    pid can not belong to another process), and fail clearly when the run had already ended."""
    proc.send_signal(signum)
    if proc.returncode is not None:
        pytest.fail(f"the run ended (rc {proc.returncode}) before {signal.Signals(signum).name} could be sent: "
                    f"{_stderr_tail(proc)}")


def checkpoint_steps(workdir):
    d = os.path.join(str(workdir), "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def logged_steps(workdir):
    """Steps of the complete train lines in metrics.jsonl (a line being written is ignored)."""
    path = os.path.join(str(workdir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                r = json.loads(line)
                if "train/loss" in r:
                    out.append(int(r["step"]))
    return out


def signalled_run(workdir, signum, every_steps, wait_for, what):
    """Start a long run (random source, no epoch end in sight), send ``signum`` once ``wait_for()`` holds;
    return (stderr, the last logged step).  Every step is logged before the loop looks at the signal, so
    the step the run stops at is exactly the last logged one."""
    proc = start(train_cmd(workdir, 1_000_000, every_steps=every_steps, delay=0.02))
    try:
        wait_until(proc, wait_for, what)
        signal_running(proc, signum)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert f"signal {int(signum)}: saved step" in err
    return err, logged_steps(workdir)[-1]


def fail(capsys, argv, *needles):
    """Runs the CLI expecting exit 1 and ONE error line holding every needle; returns the line."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"adaface-jax {argv[0]}: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def ok(capsys, argv) -> dict:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1]) if out.strip().startswith("{") else out


def assert_no_scheme_folders(tmp_path):
    """No local folder named after a URL scheme, in the runs' cwd (any depth) or in the repository root."""
    found = [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path) for n in dirs + files
             if n in SCHEME_FOLDERS]
    found += [os.path.join(REPO, n) for n in SCHEME_FOLDERS if os.path.lexists(os.path.join(REPO, n))]
    assert found == [], found
