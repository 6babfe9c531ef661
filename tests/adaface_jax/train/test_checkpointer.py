"""Checkpoints: restore on another mesh, best-by-accuracy, SIGKILL + resume is bit-identical, SIGTERM saves
exactly the step it reached.  Subprocess runs wait on what the run writes (checkpoints, log lines), never on time."""
import logging
import os
import signal

import jax
import numpy as np
import pytest

from adaface_jax import parallel
from adaface_jax.train.checkpointer import Checkpointer, restore_items
from adaface_jax.weights import calibration_file, load_weights
from adaface_jax.cli import main
from tests.support.cli_fixtures import (CLI, checkpoint_steps, logged_steps, signal_running, signalled_run, start,
                                        train_cmd, wait_until)
from tests.support.train_fixtures import E, build_sharded, random_batch


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


def test_best_checkpoint_by_a_metric_to_minimise_replaces_one_kept_by_another_metric(tmp_path):
    """best_mode='min' keeps the lowest value; a best step kept by another metric (an older run's 'mean_acc')
    cannot be compared, so the first step scored by this metric replaces it."""
    mesh, state, step = build_sharded(jax.devices()[:1], 8)
    old = Checkpointer(str(tmp_path), async_save=False)
    state, _ = step(state, parallel.host_to_global(random_batch(0, 16, 8), mesh))
    old.save_best(state, {"i": 0}, {"mean_acc": 0.99})
    old.close()
    ckpt = Checkpointer(str(tmp_path), async_save=False, best_metric="val/loss", best_mode="min")
    for i, loss in enumerate([3.0, 2.0, 2.5], start=1):
        state, _ = step(state, parallel.host_to_global(random_batch(i, 16, 8), mesh))
        ckpt.save_best(state, {"i": i}, {"val/loss": loss, "val/mean_acc": 0.5})
    ckpt.wait()
    assert ckpt.best.all_steps() == [3] and ckpt.read_meta(best=True) == {"i": 2}
    ckpt.close()


def test_load_weights_reads_a_saved_step_unpadded_with_the_run_s_thresholds(tmp_path):
    from evaluation.calibration import store_calibration  # noqa: PLC0415

    mesh, state, step = build_sharded(jax.devices()[:1], 20)
    state, _ = step(state, parallel.host_to_global(random_batch(0, 16, 20), mesh))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(state, {"arch": "tiny", "num_classes": 20, "config": {"data": {"image_size": 16}}})
    ckpt.close()
    step_dir = os.path.join(str(tmp_path), "checkpoints", "1")
    # a run's thresholds live at <workdir>/calibration.json, whether the workdir or a step folder is named
    assert calibration_file(str(tmp_path)).path == calibration_file(step_dir).path == str(tmp_path / "calibration.json")
    thresholds = {"thresholds": {"0.01": {"threshold": 0.25}}}
    store_calibration(calibration_file(str(tmp_path)), thresholds)

    arch, variables, head, meta = load_weights(str(tmp_path))
    saved = jax.device_get(state.checkpoint_items())
    assert arch == "tiny" and meta["input_size"][0] == 16 and meta["calibration"] == thresholds
    assert meta["training"]["step_dir"] == step_dir
    padded = saved["params"]["head"]["kernel"]
    assert padded.shape == (E, 24) and head["kernel"].shape == (E, 20)  # the device padding is dropped
    np.testing.assert_array_equal(head["kernel"], padded[:, :20])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved["params"]["backbone"]),
                            jax.tree_util.tree_leaves(variables["params"])):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------- subprocess runs

def _final_params(workdir):
    step = checkpoint_steps(workdir)[-1]
    return step, jax.device_get(restore_items(os.path.join(workdir, "checkpoints", str(step))))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from data_pipeline.synthetic import write_synthetic_dataset  # noqa: PLC0415
    d = tmp_path_factory.mktemp("synth8")
    write_synthetic_dataset(str(d), num_identities=8, images_per_identity=8, seed=1, show_progress=False)
    return str(d)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_dataset, caplog):
    """Kill a run (which would go on for 1000 steps) once it has checkpointed step 6 or later, resume it to
    9 steps past its last checkpoint (across an epoch boundary of the 8-step epochs), and compare with a run
    that was never interrupted.  The step delay only slows the run down; nothing depends on timing."""
    run_dir, ref_dir = tmp_path / "killed", tmp_path / "ref"
    proc = start(train_cmd(run_dir, 1000, data_dir=tiny_dataset, delay=0.02), ndev=8)
    try:
        wait_until(proc, lambda: any(s >= 6 for s in checkpoint_steps(run_dir)), "a checkpoint at step >= 6")
        signal_running(proc, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint_steps(run_dir)[-1]
    assert killed_at >= 6
    total = killed_at + 9

    # The resumed run and the uninterrupted one in this process, on the killed run's 8 devices.
    argv = lambda workdir: train_cmd(workdir, total, data_dir=tiny_dataset)[len(CLI):]
    with caplog.at_level(logging.INFO, logger="adaface_jax.train"):
        assert main(argv(run_dir)) == 0
    assert f"resumed from {run_dir} at step {killed_at}" in caplog.text
    assert main(argv(ref_dir)) == 0

    step_a, a = _final_params(ref_dir)
    step_b, b = _final_params(run_dir)
    assert step_a == step_b == total
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sigterm_before_the_first_periodic_checkpoint_saves_the_step_reached(tmp_path):
    run_dir = tmp_path / "term"
    err, last = signalled_run(run_dir, signal.SIGTERM, 100_000, lambda: logged_steps(run_dir), "the first log line")
    assert f"saved step {last} and stopping" in err
    assert checkpoint_steps(run_dir) == [last]  # no periodic checkpoint yet: only the one the signal wrote
    step, items = _final_params(run_dir)
    assert int(items["step"]) == step == last


@pytest.mark.slow
def test_sigterm_after_a_periodic_checkpoint_saves_the_step_reached(tmp_path):
    run_dir = tmp_path / "term3"
    err, last = signalled_run(run_dir, signal.SIGTERM, 3, lambda: 3 in checkpoint_steps(run_dir),
                            "the checkpoint of step 3")
    assert last >= 3 and f"saved step {last} and stopping" in err
    assert checkpoint_steps(run_dir)[-1] == last  # the step reached, whether or not it is a multiple of 3
    step, items = _final_params(run_dir)
    assert int(items["step"]) == step == last
