"""The benchmark harnesses refuse bad input in one line: a bad option value is argparse's usage error
(status 2), bad input found later (a missing file, a folder with someone else's files) is one
``<script>: error: ...`` line (status 1); never a traceback, and never a deleted user file."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")

# (script and arguments, exit status, what the one line must name); every case fails before any work starts
CASES = [
    ("bench_train_step.py --archs ir_18 ir_999", 2, "unknown arch 'ir_999'"),
    ("bench_train_step.py --batch 0", 2, "--batch: expected an integer >= 1, got 0"),
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
    ("bench_input_pipeline.py --data-dir {tmp}/nowhere", 1, "nowhere is not a dataset written by"),
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
