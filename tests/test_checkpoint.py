"""Checkpoints: restore on another mesh, best-by-accuracy, SIGKILL + resume is bit-identical, SIGTERM saves."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from adaface_jax import parallel
from adaface_jax.checkpoint import Checkpointer, restore_items
from train_fixtures import E, build_sharded, random_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_written_on_8_devices_restores_on_4(tmp_path):
    mesh8, state8, step8 = build_sharded(jax.devices(), 20)
    state8, _ = step8(state8, parallel.host_to_global(random_batch(0, 16, 20), mesh8))
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(state8, {"num_classes": 20, "padded_classes": 24})
    ckpt.wait()

    mesh4, fresh4, _ = build_sharded(jax.devices()[:4], 20)
    restored, meta = ckpt.restore(fresh4, mesh4)
    ckpt.close()
    assert meta["padded_classes"] == 24 and int(restored.step) == 1
    kernel = restored.params["head"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(E, 6)}
    assert {d.id for d in kernel.sharding.device_set} == {d.id for d in jax.devices()[:4]}
    want, got = jax.device_get(state8.checkpoint_items()), jax.device_get(restored.checkpoint_items())
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert not np.array_equal(want["params"]["head"]["kernel"],
                              jax.device_get(fresh4.params["head"]["kernel"]))  # it really was restored


def test_best_checkpoint_follows_validation_accuracy(tmp_path):
    mesh, state, step = build_sharded(jax.devices()[:1], 8)
    ckpt = Checkpointer(str(tmp_path), max_to_keep=1)
    for i, acc in enumerate([0.5, 0.7, 0.6]):
        state, _ = step(state, parallel.host_to_global(random_batch(i, 16, 8), mesh))
        ckpt.save(state, {"i": i})
        ckpt.save_best(state, {"i": i}, {"mean_acc": acc})
    ckpt.wait()
    assert ckpt.latest.all_steps() == [3]
    assert ckpt.best.best_step() == 2 and ckpt.read_meta(best=True) == {"i": 1}
    ckpt.close()


# ------------------------------------------------------------------------------------- subprocess runs

def _train_cmd(workdir, data_dir, total_steps, delay=0.0):
    return [sys.executable, "-m", "adaface_jax.cli", "train", "--config", os.path.join(REPO, "configs", "cpu_synthetic.py"),
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", "--config.model.arch=tiny",
            "--config.model.embedding_size=16", "--config.num_classes=8", "--config.global_batch_size=8",
            f"--config.total_steps={total_steps}", "--config.checkpoint.every_steps=2", "--config.eval.every_epochs=0",
            "--config.progress=false", "--config.sample_grid=false", f"--config.debug_step_delay_s={delay}"]


def _env(ndev=4):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={ndev}", PYTHONPATH=REPO,
               CUDA_VISIBLE_DEVICES="")
    return env


def _final_params(workdir):
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    items = restore_items(os.path.join(workdir, "checkpoints", str(steps[-1])))
    return steps[-1], jax.device_get(items)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from data_pipeline.synthetic import write_synthetic_dataset  # noqa: PLC0415
    d = tmp_path_factory.mktemp("synth8")
    write_synthetic_dataset(str(d), num_identities=8, images_per_identity=8, seed=1, show_progress=False)
    return str(d)


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_dataset):
    total = 16
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    # The uninterrupted reference runs alongside the run that gets killed.
    ref = subprocess.Popen(_train_cmd(ref_dir, tiny_dataset, total), env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_train_cmd(run_dir, tiny_dataset, total, delay=0.3), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(d.isdigit() and int(d) >= 6 for d in os.listdir(ckpts)):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert 6 <= killed_at < total

    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]
    resumed = subprocess.run(_train_cmd(run_dir, tiny_dataset, total), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    step_a, a = _final_params(ref_dir)
    step_b, b = _final_params(run_dir)
    assert step_a == step_b == total
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_sigterm_saves_and_exits_cleanly(tmp_path, tiny_dataset):
    run_dir = tmp_path / "term"
    proc = subprocess.Popen(_train_cmd(run_dir, tiny_dataset, 1000, delay=0.2), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "signal 15" in err
    last_logged = int(open(metrics).read().strip().splitlines()[-1].split(",")[0].split(":")[1])
    step, items = _final_params(run_dir)
    assert step >= last_logged and int(items["step"]) == step
