"""`adaface-jax train` and the train() it runs: bad recipes, fields, weights and resumes are one line before anything
is written; --init-from, SIGINT, a resume on another device count, per-device statistics and an undecodable record,
each against an independent reference."""
import hashlib
import json
import os
import signal

import jax
import numpy as np
import pytest
import torch

from adaface_jax.cli import main
from adaface_jax.errors import ConfigError
from adaface_jax.train.loop import RESUME_MODEL_FIELDS, check_checkpoint_shapes, first_shape_mismatch
from tests.support import REPO
from tests.support.cli_fixtures import checkpoint_steps, logged_steps, signalled_run
from tests.support.cli_output import one_error_line
from tests.support.datasets import rewrite_shard, truncated
from tests.support.train_fixtures import cpu_config

CPU_CONFIG = os.path.join(REPO, "configs", "cpu_synthetic.py")


def test_train_bad_config_file_and_fields(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")]) == 1
    one_error_line(capsys, "train", "nope.py", "file not found")
    text = tmp_path / "recipe.txt"
    text.write_text("not python\n")
    assert main(["train", "--config", str(text), "--workdir", str(tmp_path / "w")]) == 1
    one_error_line(capsys, "train", "recipe.txt", "not a Python file")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    assert main(["train", "--config", str(broken), "--workdir", str(tmp_path / "w")]) == 1
    one_error_line(capsys, "train", "broken.py", "SyntaxError")
    assert main(["train", "--config", CPU_CONFIG, "--workdir", str(tmp_path / "w"), "--config.epochs=two"]) == 1
    one_error_line(capsys, "train", "--config.epochs='two'", "expected int")
    assert main(["train", "--config", CPU_CONFIG, "--workdir", str(tmp_path / "w"), "--config.model.arch=ir_77",
                 "--config.data.source=random", "--config.data.num_images=16"]) == 1
    one_error_line(capsys, "train", "config.model.arch='ir_77'")


# the command


TINY = ["--config.model.arch=tiny", "--config.model.embedding_size=16", "--config.data.source=random",
        "--config.data.num_images=64", "--config.data.image_size=16", "--config.global_batch_size=8",
            "--config.evals.verification.every_epochs=0", "--config.progress=false", "--config.sample_grid=false"]


def _train(workdir, *extra):
    return main(["train", "--config", CPU_CONFIG, "--workdir", str(workdir),
                 *TINY, *extra])


def _latest_items(workdir):
    from adaface_jax.train.checkpointer import restore_items  # noqa: PLC0415
    return jax.device_get(restore_items(os.path.join(str(workdir), "checkpoints", str(checkpoint_steps(workdir)[-1]))))


def test_train_init_from_a_workdir_from_the_command_line(tmp_path):
    src, tuned = tmp_path / "src", tmp_path / "tuned"
    assert _train(src, "--config.num_classes=6", "--config.total_steps=2") == 0
    # lr 0: the one fine-tuning step leaves the parameters where --init-from put them
    assert _train(tuned, "--config.num_classes=9", "--config.total_steps=1", "--config.lr=0.0", "--config.seed=7",
                  "--init-from", str(src)) == 0
    a, b = _latest_items(src), _latest_items(tuned)
    assert int(b["step"]) == 1
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a["params"]["backbone"]),
                            jax.tree_util.tree_leaves(b["params"]["backbone"])):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert b["params"]["head"]["kernel"].shape[1] >= 9  # a fresh 9-class head (padded for the devices)


def test_sigint_saves_the_step_reached_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "int"
    err, last = signalled_run(run_dir, signal.SIGINT, 100_000, lambda: logged_steps(run_dir), "the first log line")
    assert f"signal {int(signal.SIGINT)}: saved step {last} and stopping" in err
    assert checkpoint_steps(run_dir) == [last]
    assert int(_latest_items(run_dir)["step"]) == last


# train(): devices, statistics, bad records


def _tiny_config(**over):
    from adaface_jax.train.config import apply_overrides, load_config  # noqa: PLC0415
    base = {"model.arch": "tiny", "model.embedding_size": "16", "data.source": "random", "data.num_images": "80000",
            "data.image_size": "16", "num_classes": "8", "global_batch_size": "8", "evals.verification.every_epochs": "0",
            "progress": "false", "sample_grid": "false", "checkpoint.every_steps": "2", "log_every": "1"}
    return apply_overrides(load_config(CPU_CONFIG),
                           {**base, **{k: str(v) for k, v in over.items()}})


def _items(state):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.checkpoint_items()))}


def test_resume_on_another_device_count_then_train_on(tmp_path):
    """2 steps on 4 devices, resumed on 2 devices to step 4 == 4 uninterrupted steps on 4 devices (up to
    reduction order, measured ~1e-5 of a momentum trace's scale)."""
    from adaface_jax.train.loop import train  # noqa: PLC0415
    wd, ref_wd = str(tmp_path / "run"), str(tmp_path / "ref")
    _, at2 = train(_tiny_config(total_steps=2), wd, devices=jax.devices()[:4])
    summary, resumed = train(_tiny_config(total_steps=4), wd, devices=jax.devices()[4:6])
    assert summary["step"] == 4 and checkpoint_steps(wd) == [2, 4]
    kernel = resumed.params["head"]["kernel"]
    assert {d.id for d in kernel.sharding.device_set} == {d.id for d in jax.devices()[4:6]}
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 4)}
    _, ref = train(_tiny_config(total_steps=4), ref_wd, devices=jax.devices()[:4])
    got, want, before = _items(resumed), _items(ref), _items(at2)
    assert int(got["['step']"]) == 4
    for k, v in want.items():
        atol = 5e-5 * max(1.0, float(np.abs(v).max())) if k.startswith("['opt_state']") else 5e-5
        np.testing.assert_allclose(got[k], v, atol=atol, rtol=1e-5, err_msg=k)
    moved = max(np.abs(got[k] - before[k]).max() for k in got if k.startswith("['params']"))
    assert moved > 1e-3  # the resumed run really trained on


def test_per_device_stats_gives_the_step_per_device_groups(tmp_path):
    """config.per_device_stats=true on 2 devices: train() runs the step with BatchNorm and AdaFace statistics
    in 2 groups -- the state equals a step built by hand with 2 groups, and differs from the global one."""
    from adaface_jax import parallel  # noqa: PLC0415
    from adaface_jax.heads import head_params  # noqa: PLC0415
    from adaface_jax.train.loop import random_batches, steps_per_epoch, train  # noqa: PLC0415
    from adaface_jax.train.setup import init_state, make_schedule  # noqa: PLC0415
    from adaface_jax.train.step import StepConfig, make_train_step  # noqa: PLC0415
    from adaface_jax.models import TinyBackbone  # noqa: PLC0415
    devices = jax.devices()[:2]
    config = _tiny_config(total_steps=1, per_device_stats="true")
    _, state = train(config, str(tmp_path / "pds"), devices=devices)
    got = _items(state)

    mesh = parallel.make_mesh(devices)
    schedule = make_schedule(config, steps_per_epoch(config, None))
    batch = next(random_batches(config, 0, 8))  # what train() fed at step 0

    def by_hand(groups):
        model = TinyBackbone(embedding_size=16, dtype=jax.numpy.float32, bn_groups=groups)
        s, shardings = init_state(config, model, mesh, schedule, parallel.padded_num_classes(8, 2))
        kernel0 = np.asarray(jax.device_get(s.params["backbone"]["conv"]["kernel"]))
        cfg = StepConfig(head="adaface", head_kwargs=head_params(config.head), num_classes=8, head_num_groups=groups,
                         lr_fn=schedule, embedding_sharding=parallel.embedding_sharding(mesh),
                         logits_sharding=parallel.logits_sharding(mesh))
        step = parallel.jit_sharded(make_train_step(model, cfg), mesh, shardings)
        s, _ = step(s, parallel.host_to_global(batch, mesh))
        return _items(s), kernel0

    grouped, kernel0 = by_hand(2)
    pooled, _ = by_hand(1)
    for k, v in grouped.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(np.abs(got[k] - pooled[k]).max() > 1e-4 for k in got if k.startswith("['params']"))

    # The first BatchNorm's running statistics, by hand (PyTorch conv, SAME padding of a 3x3/2 conv on
    # 16x16 = 0 before, 1 after): momentum 0.1 towards device 0's half of the batch, unbiased variance.
    x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    w = torch.from_numpy(kernel0.transpose(3, 2, 0, 1).copy())
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), w, stride=2).double().numpy()
    for rows, name in ((slice(0, 4), "device 0"), (slice(0, 8), "global")):
        g = y[rows].transpose(1, 0, 2, 3).reshape(y.shape[1], -1)
        mean, var = 0.1 * g.mean(1), 0.9 + 0.1 * g.var(1, ddof=1)
        close = (np.allclose(got["['batch_stats']['bn']['mean']"], mean, atol=1e-5)
                 and np.allclose(got["['batch_stats']['bn']['var']"], var, atol=1e-5))
        assert close == (name == "device 0"), name


def _train_config(data_dir, **kw):
    settings = dict(num_classes=4, global_batch_size=8, log_every=1, progress=False, sample_grid=False,
                    evals__verification__every_epochs=0, model__arch="tiny", model__embedding_size=16, data__image_size=16,
                    checkpoint__every_steps=1, checkpoint__async_save=False)
    return cpu_config(data_dir, **{**settings, **kw})


def test_training_survives_a_bad_record_counts_it_and_resumes_exactly(small_dataset, tmp_path):
    import jax

    from adaface_jax.train.loop import TooManyBadRecords, train
    rewrite_shard(small_dataset, 1, lambda recs: [(truncated(r[0]) if i == 0 else r[0], r[1], r[2])
                                                  for i, r in enumerate(recs)])
    devices = jax.devices()[:1]
    straight, state_a = train(_train_config(small_dataset, total_steps=4), str(tmp_path / "a"), devices=devices)
    assert straight["step"] == 4 and straight["bad_records"] == 2
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["train/bad_records"] == 2
    assert records[0]["train/bad_records"] + records[1]["train/bad_records"] == 1  # once in epoch 0

    train(_train_config(small_dataset, total_steps=2), str(tmp_path / "b"), devices=devices)
    resumed, state_b = train(_train_config(small_dataset, total_steps=4), str(tmp_path / "b"), devices=devices)
    assert resumed["bad_records"] == 2
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(state_a.params)),
                    jax.tree_util.tree_leaves(jax.device_get(state_b.params))):
        np.testing.assert_array_equal(x, y)

    with pytest.raises(TooManyBadRecords, match=r"1 records of .* failed to decode by step \d, more than "
                                                r"config.data.max_bad_records=0"):
        train(_train_config(small_dataset, total_steps=4, data__max_bad_records=0), str(tmp_path / "c"),
              devices=devices)


# ---- bad input a user can fix: a value written onto a config section, weights
# of another shape for --init-from, a resume with a model, head, class count or precision the checkpoint was
# not written with, validation sets that are not there, an unknown evaluator type, a best-checkpoint metric no
# evaluator logs, and a dropped config key. Each ends in exit status 1 and ONE stderr line
# naming the field (or leaf) and what was expected, with no traceback, before anything is written: a new
# workdir is not created and an existing checkpoint is not touched.

TINY_RUN = ["--config.data.source=random", "--config.data.num_images=8000000", "--config.data.image_size=16",
            "--config.model.arch=tiny", "--config.model.embedding_size=16", "--config.num_classes=8",
            "--config.global_batch_size=8", "--config.total_steps=2", "--config.checkpoint.every_steps=2",
            "--config.evals.verification.every_epochs=0", "--config.progress=false", "--config.sample_grid=false"]


def train_tiny(workdir, *extra):
    """The tiny backbone on noise for 2 steps, checkpointed at step 2."""
    return main(["train", "--config", CPU_CONFIG, "--workdir", str(workdir), *TINY_RUN, *extra])


def train_error_line(capsys, *needles):
    """The one `adaface-jax train: error:` line (log lines of the run are left out), holding every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "WARNING" not in line and " INFO " not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("adaface-jax train: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree_digest(folder) -> str:
    """Every file's path and bytes under ``folder``: unchanged means nothing was written or removed."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run of the tiny backbone (embedding 16, 8 classes, AdaFace, float32)."""
    workdir = tmp_path_factory.mktemp("train_errors") / "run"
    assert train_tiny(workdir) == 0
    return workdir


@pytest.mark.parametrize("section,value,hint", [("model", "ir_50", "--config.model.arch=ir_50"),
                                                ("head", "arcface", "--config.head.name=arcface"),
                                                ("evals.verification", "lfw", "--config.evals.verification.sets")])
def test_a_value_on_a_config_section_names_the_key_to_use(tmp_path, capsys, section, value, hint):
    workdir = tmp_path / "new"
    assert train_tiny(workdir, f"--config.{section}={value}") == 1
    train_error_line(capsys, f"config.{section} is a section", hint)
    assert not workdir.exists()


@pytest.mark.parametrize("override,field,was,now", [
    ("--config.model.arch=ir_18", "model.arch", "'tiny'", "'ir_18'"),
    ("--config.model.embedding_size=32", "model.embedding_size", "16", "32"),
    ("--config.num_classes=12", "num_classes", "8", "12"),
    ("--config.head.name=arcface", "head.name", "'adaface'", "'arcface'"),
    ("--config.precision=float16", "precision", "'float32'", "'float16'"),
])
def test_resume_with_another_model_names_the_field_and_keeps_the_checkpoint(trained, capsys, override, field, was,
                                                                             now):
    before = tree_digest(trained)
    assert train_tiny(trained, override, "--config.total_steps=4") == 1
    train_error_line(capsys, f"config.{field}: the checkpoint in {trained} (step 2) was written with {field}={was}",
                   f"this run has {now}")
    assert tree_digest(trained) == before


def test_resume_may_change_what_the_arrays_do_not_depend_on(trained, tmp_path, capsys):
    """Dropout, the learning rate and Partial FC's sample rate leave the checkpoint's arrays as they are: the
    resume goes on (a copy of the run, so the module's run stays at step 2)."""
    import shutil  # noqa: PLC0415
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    assert train_tiny(copy, "--config.total_steps=3", "--config.lr=0.01", "--config.model.dropout_rate=0.1",
                 "--config.head.sample_rate=0.5") == 0
    assert sorted(os.listdir(copy / "checkpoints")) == ["2", "3"]


def test_init_from_weights_of_another_width_is_refused_before_the_workdir_exists(trained, tmp_path, capsys):
    workdir = tmp_path / "finetune"
    assert train_tiny(workdir, "--init-from", str(trained), "--config.model.embedding_size=32") == 1
    line = train_error_line(capsys, f"--init-from {trained}: params/", "expects", "embedding_size=32")
    assert "of shape" in line and "(16" in line and "32)" in line, line
    assert not workdir.exists()


def test_init_from_another_architecture_names_a_missing_leaf(trained, tmp_path, capsys):
    workdir = tmp_path / "finetune"
    assert train_tiny(workdir, "--init-from", str(trained), "--config.model.arch=ir_18", "--config.model.width=8",
                 "--config.data.image_size=112") == 1
    train_error_line(capsys, f"--init-from {trained}: ", "arch='ir_18'", "missing")
    assert not workdir.exists()


def test_no_validation_set_found_is_refused_before_the_workdir_exists(tmp_path, capsys):
    workdir = tmp_path / "run"
    bins = tmp_path / "bins"
    bins.mkdir()
    assert train_tiny(workdir, "--config.evals.verification.every_epochs=1",
                 f"--config.evals.verification.bin_dir={bins}") == 1
    train_error_line(capsys, "config.evals.verification: no *.bin found in", str(bins),
                   "every_epochs=0")
    assert not workdir.exists()
    assert train_tiny(workdir, "--config.evals.verification.every_epochs=1",
                 f"--config.evals.verification.bin_dir={tmp_path / 'nowhere'}") == 1
    train_error_line(capsys, "config.evals.verification.bin_dir=", "directory not found")
    assert not workdir.exists()


@pytest.mark.parametrize("override,needles", [
    ("--config.evals.verification.type=ijb", ("config.evals.verification.type='ijb': unknown evaluator type; "
                                              "expected one of ['verification']",)),
    ("--config.checkpoint.best_metric=val/lfw_acc", ("config.checkpoint.best_metric='val/lfw_acc' is not logged",
                                                     "['val/mean_acc']")),
    ("--config.half_precision=false", ("--config.half_precision: no longer a config field",
                                       "config.precision='float32'|'bfloat16'|'float16'")),
])
def test_a_bad_evaluator_best_metric_or_dropped_key_is_one_line(tmp_path, capsys, override, needles):
    workdir = tmp_path / "new"
    assert train_tiny(workdir, "--config.evals.verification.every_epochs=1", override) == 1
    train_error_line(capsys, *needles)
    assert not workdir.exists()


def test_resume_fields_cover_every_array_shape_setting():
    """The fields a resume compares are exactly those that change the checkpoint's array shapes (the precision
    rule is separate): one removed or added is caught here."""
    assert RESUME_MODEL_FIELDS == ("model.arch", "model.width", "model.embedding_size", "num_classes", "head.name")


def test_shape_check_names_the_first_differing_leaf():
    class Meta:  # what orbax's metadata gives for an array
        def __init__(self, shape):
            self.shape = shape
    target = {"params": {"backbone": {"a": np.zeros((3, 4))}, "head": {"kernel": np.zeros((16, 8))}},
              "head_state": (np.zeros(1), np.zeros(1))}
    saved = {"params": {"backbone": {"a": Meta((3, 4))}, "head": {"kernel": Meta((16, 12))}},
             "head_state": [Meta((1,)), Meta((1,))]}
    assert first_shape_mismatch(target, saved) == ("params/head/kernel", "of shape (16, 8)", "of shape (16, 12)")
    with pytest.raises(ConfigError, match=r"checkpoint W: params/head/kernel is of shape \(16, 12\), this run's "
                                          r"configuration expects of shape \(16, 8\)"):
        check_checkpoint_shapes(saved, target, "W")
    saved["params"]["head"]["kernel"] = Meta((16, 8))
    check_checkpoint_shapes(saved, target, "W")  # a tuple saved as a list compares equal
    del saved["head_state"]
    assert first_shape_mismatch(target, saved) == ("head_state/0", "of shape (1,)", "missing")


def test_a_shape_change_no_field_rule_knows_is_named_by_leaf(trained, capsys, monkeypatch):
    """Behind the field rules, the saved arrays' shapes are compared with the state this run built: with the
    field rules emptied, a changed embedding size is still refused in one line naming the leaf, before orbax
    is asked to restore."""
    from adaface_jax.train import loop  # noqa: PLC0415
    monkeypatch.setattr(loop, "RESUME_MODEL_FIELDS", ())
    before = tree_digest(trained)
    assert train_tiny(trained, "--config.model.embedding_size=32", "--config.total_steps=4") == 1
    train_error_line(capsys, f"checkpoint {trained}/checkpoints (step 2): ", "is of shape", "this run's configuration "
                   "expects of shape")
    assert tree_digest(trained) == before
