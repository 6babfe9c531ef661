"""benchmarks/device_check.sh with tiny settings on the CPU, as the accelerator host would run it: no
TensorFlow and no ml_collections importable (both replaced by modules that raise ImportError)."""
import os
import re
import subprocess
import sys
from tests.support import REPO as REPO_ROOT

REPO = str(REPO_ROOT)


def _no_tf_path(tmp_path):
    for name in ("tensorflow", "ml_collections"):
        d = tmp_path / name
        d.mkdir()
        (d / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this host (test stub)')\n")
    return str(tmp_path)


def _env(tmp_path, **extra):
    env = dict(os.environ, PYTHONPATH=_no_tf_path(tmp_path), JAX_PLATFORMS="cpu", **extra)
    env.pop("XLA_FLAGS", None)  # one device, as on the one-GPU host
    return env


def test_training_path_imports_neither_tensorflow_nor_ml_collections(tmp_path):
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import device_train_mfu; "
            "from adaface_jax import parallel; from adaface_jax.train.setup import build_trainer; "
            "cfg, src = device_train_mfu.make_config('ir_18', 10); "
            "assert src.startswith('plain dict'), src; "
            "bad = [m for m in ('tensorflow', 'ml_collections') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_env(tmp_path),
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_device_check_script_runs_tiny_on_cpu(tmp_path):
    env = _env(tmp_path, DEVICE_CHECK_ARCHS="ir_18", DEVICE_CHECK_BATCH="2", DEVICE_CHECK_CLASSES="64",
               DEVICE_CHECK_STEPS="1", DEVICE_CHECK_EXTRA="--width 8 --peak-tflops 0.1 --precision float32")
    r = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "device_check.sh")], capture_output=True, text=True,
                       cwd=str(tmp_path), env=env, timeout=400)
    out = r.stdout
    assert r.returncode == 0, out[-2000:] + r.stderr[-2000:]
    assert re.search(r"^== device check: 1 x cpu \(cpu\)$", out, re.M)
    assert "device cpu x1; ir_18 float32; 64 classes (padded 64); global batch 2" in out
    assert "config plain dict (no ml_collections)" in out
    ips = float(re.search(r"images/s total ([\d.]+); per chip ([\d.]+)", out).group(2))
    step_ms = float(re.search(r"step ([\d.]+) ms", out).group(1))
    assert abs(ips - 2 / (step_ms / 1e3)) / ips < 0.01       # images/s is the batch over the step time
    gflop = float(re.search(r"\(([\d.]+) GFLOP/image\)", out).group(1))
    mfu = float(re.search(r"MFU ([\d.]+)% of 0.1 TFLOP/s per chip", out).group(1))
    assert abs(mfu - 100 * gflop * 1e9 * ips / 0.1e12) <= 0.1 + 0.02 * mfu
    assert re.search(r"^forward images/s total [\d.]+; per chip [\d.]+$", out, re.M)
    assert "peak memory" in out
    assert "input pipeline: skipped: no TensorFlow" in out
