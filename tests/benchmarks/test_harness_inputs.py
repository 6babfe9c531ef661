"""The benchmark harnesses refuse bad input in one line: a bad option value is argparse's usage error
(status 2), bad input found later (a missing file, a folder with someone else's files) is one
``<script>: error: ...`` line (status 1); never a traceback, and never a deleted user file."""
import os
import subprocess
import sys

import pytest
from tests.support import REPO as REPO_ROOT

REPO = str(REPO_ROOT)
BENCH = os.path.join(REPO, "benchmarks")

# (script and arguments, exit status, what the one line must name); every case fails before any work starts
CASES = [
    ("bench_train_step.py --archs ir_18 ir_999", 2, "unknown arch 'ir_999'"),
    ("bench_train_step.py --batch 0", 2, "--batch: expected an integer >= 1, got 0"),
    ("bench_train_step.py --profile {tmp}/empty.bin", 2, "--profile {tmp}/empty.bin: exists and is not a folder"),
    ("bench_forward.py --arch resnet50", 2, "unknown arch 'resnet50'"),
    ("bench_export.py --iters -3", 2, "--iters: expected an integer >= 1, got -3"),
    ("device_train_mfu.py --arch ir_7 --flops-only", 2, "unknown arch 'ir_7'"),
    ("device_train_mfu.py --peak-tflops 0 --flops-only", 2, "--peak-tflops: expected a number > 0, got 0"),
    ("device_train_mfu.py --sample-rate 1.5 --flops-only", 2, "--sample-rate: expected a sample rate 0 < r <= 1"),
    ("bench_partial_fc.py --rates 1.0 nan", 2, "--rates: expected a sample rate 0 < r <= 1, got nan"),
    ("bench_partial_fc.py --devices 0", 2, "--devices: expected an integer >= 1, got 0"),
    ("bench_rec_convert.py --images 0", 2, "--images: expected an integer >= 1, got 0"),
    ("bench_input_pipeline.py --num-streams x", 2, "--num-streams: expected an integer >= 1, got 'x'"),
    ("bench_verification.py --bin {tmp}/missing.bin", 1, "missing.bin: No such file or directory"),
    ("bench_verification.py --bin {tmp}/empty.bin", 1, "empty.bin: not a .bin verification set"),
    ("bench_input_pipeline.py --data-dir {tmp}/nowhere", 1, "dataset folder {tmp}/nowhere does not exist"),
    ("bench_ijbc_scale.py --workdir {tmp}/empty.bin", 1, "exists and is not a folder"),
    ("bench_ijbc_scale.py --workdir {tmp}/mine", 1, "holds files this benchmark did not write"),
]


@pytest.fixture()
def bad_inputs(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.txt").write_text("a user's file\n")
    return tmp_path


@pytest.mark.parametrize("command,status,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(bad_inputs, command, status, names):
    script, *args = command.format(tmp=bad_inputs).split()
    names = names.format(tmp=bad_inputs)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                       cwd=str(bad_inputs), env=env, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert r.returncode == status, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and names in lines[0], r.stderr
    assert (bad_inputs / "mine" / "results.txt").read_text() == "a user's file\n"


def test_ijbc_scale_deletes_only_what_it_wrote(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        import bench_ijbc_scale as bench
    finally:
        sys.path.remove(BENCH)
    new = tmp_path / "new"
    assert bench.claim_workdir(str(new)) is True
    (new / "IJBC" / "meta").mkdir(parents=True)
    (new / "features.npy").write_bytes(b"x")
    bench.clean_workdir(str(new), True)
    assert not new.exists()                            # made by it, emptied by it: removed

    empty = tmp_path / "empty"
    empty.mkdir()
    assert bench.claim_workdir(str(empty)) is False
    (empty / "norms.npy").write_bytes(b"x")
    assert bench.claim_workdir(str(empty)) is False    # an earlier run's folder (marked) is taken again
    (empty / "notes.txt").write_text("written meanwhile by the user")
    bench.clean_workdir(str(empty), False)
    assert sorted(os.listdir(empty)) == ["notes.txt"]  # the folder and the user's file stay


def test_train_step_profile_summary_adds_up(tmp_path, capsys):
    """``bench_train_step.py --profile``: the per-kind times are read from a real jax.profiler trace, and the
    printed total of the named ops is the sum of the kinds listed (all of them, with a large ``top``)."""
    import re

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, BENCH)
    try:
        import bench_train_step as bench
    finally:
        sys.path.remove(BENCH)
    x = jnp.ones((256, 256))
    f = jax.jit(lambda a: jnp.tanh(a @ a.T + 1.0).sum(0))
    jax.block_until_ready(f(x))

    def run(steps):
        import time
        t = time.perf_counter()
        for _ in range(steps):
            out = f(x)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    bench.profile_step(run, str(tmp_path / "trace"), steps=2, top=1000)
    out = capsys.readouterr().out
    assert list((tmp_path / "trace").rglob("perfetto_trace.json.gz")), out
    rows = [(float(ms), float(pct)) for ms, pct in re.findall(r"^\s+([\d.]+) ms\s+([\d.]+)%\s+\S+ \(\d+ per step\)$",
                                                               out, re.M)]
    total_ms, total_pct = map(float, re.search(r"^\s+([\d.]+) ms\s+([\d.]+)%\s+all named ops", out, re.M).groups())
    assert rows, out
    assert abs(sum(ms for ms, _ in rows) - total_ms) <= 0.1 * len(rows) + 1e-6, out
    assert 0 < total_pct <= 100 and all(0 <= pct <= total_pct + 0.05 for _, pct in rows), out


def test_op_time_by_kind_on_a_hand_made_trace(tmp_path):
    """The trace summary against hand-summed numbers: HLO-named events grouped by kind over 2 steps, the
    runtime's and Python's events left out, and only XLA's Eigen pool counted as compute threads."""
    import gzip
    import json

    sys.path.insert(0, BENCH)
    try:
        import bench_train_step as bench
    finally:
        sys.path.remove(BENCH)
    meta = lambda tid, name: {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": name}}
    op = lambda tid, name, us: {"ph": "X", "name": name, "pid": 1, "tid": tid, "ts": 0, "dur": us}
    events = [meta(1, "python3"), meta(2, "tf_XLAEigen/1"), meta(3, "tf_XLAEigen/2"), meta(4, "tf_XLAPjRtCpuClient/9"),
              op(2, "transpose_copy_fusion.103", 3000), op(3, "transpose_copy_fusion.7", 1000),
              op(2, "transpose_copy_fusion", 2000), op(3, "copy.12", 500), op(4, "wrapped_is-finite", 100),
              op(1, "$api.py:2479 block_until_ready", 90000), op(2, "ThunkExecutor::Execute", 40000),
              op(3, "end: ynn_fusion", 700), op(4, "ThunkExecutor::Execute (wait for completion)", 50000),
              {"ph": "i", "name": "copy.1", "pid": 1, "tid": 2, "ts": 0}]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    per_kind, calls, threads = bench.op_time_by_kind(str(path), steps=2)
    assert dict(per_kind) == pytest.approx({"transpose_copy_fusion": 0.003, "copy": 0.00025,
                                            "wrapped_is-finite": 0.00005})
    assert dict(calls) == {"transpose_copy_fusion": 3, "copy": 1, "wrapped_is-finite": 1}
    assert threads == {(1, 2), (1, 3)}


def test_bench_bucket_smallest_run_prints_both_ratios(tmp_path):
    """benchmarks/bench_bucket.py at its smallest settings (its own Cloud Storage server on loopback, the tiny
    backbone at 16x16): it runs to the end and prints the train-step and the input ratio lines; its temporary
    folders (the local workdirs and dataset, the server's) are gone afterwards."""
    import re

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp))
    args = ("--arch tiny --image-size 16 --batch 8 --num-classes 8 --steps 5 --warmup 1 --save-every 4 --log-every 2 "
            "--train-rounds 1 --save-repeats 1 --images 40 --input-batch 8 --input-batches 1 --rounds 1").split()
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_bucket.py"), *args], capture_output=True,
                       text=True, cwd=str(tmp_path), env=env, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.search(r"^ratio, train step with the workdir in the bucket / local .*: [\d.]+x per step", r.stdout,
                     re.M), r.stdout
    assert re.search(r"^ratio, input images/s from the bucket / local: [\d.]+x$", r.stdout, re.M), r.stdout
    assert "data_pipeline/input.py settings: " in r.stdout
    assert list(tmp.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
