"""Bad input through `adaface-jax train` that a user can fix: a value written onto a config section, weights
of another shape for --init-from, a resume with a model, head, class count or precision the checkpoint was
not written with, and validation sets that are not there. Each ends in exit status 1 and ONE stderr line
naming the field (or leaf) and what was expected, with no traceback, before anything is written: a new
workdir is not created and an existing checkpoint is not touched."""
import hashlib
import os

import numpy as np
import pytest

from adaface_jax.cli import main
from adaface_jax.errors import ConfigError
from adaface_jax.train.loop import RESUME_MODEL_FIELDS, check_checkpoint_shapes, first_shape_mismatch
from cli_fixtures import REPO

CONFIG = os.path.join(REPO, "configs", "cpu_synthetic.py")
TINY = ["--config.data.source=random", "--config.data.num_images=8000000", "--config.data.image_size=16",
        "--config.model.arch=tiny", "--config.model.embedding_size=16", "--config.num_classes=8",
        "--config.global_batch_size=8", "--config.total_steps=2", "--config.checkpoint.every_steps=2",
        "--config.evals.verification.every_epochs=0", "--config.progress=false", "--config.sample_grid=false"]


def train(workdir, *extra):
    return main(["train", "--config", CONFIG, "--workdir", str(workdir), *TINY, *extra])


def one_error_line(capsys, *needles):
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
    assert train(workdir) == 0
    return workdir


@pytest.mark.parametrize("section,value,hint", [("model", "ir_50", "--config.model.arch=ir_50"),
                                                ("head", "arcface", "--config.head.name=arcface"),
                                                ("evals.verification", "lfw", "--config.evals.verification.sets")])
def test_a_value_on_a_config_section_names_the_key_to_use(tmp_path, capsys, section, value, hint):
    workdir = tmp_path / "new"
    assert train(workdir, f"--config.{section}={value}") == 1
    one_error_line(capsys, f"config.{section} is a section", hint)
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
    assert train(trained, override, "--config.total_steps=4") == 1
    one_error_line(capsys, f"config.{field}: the checkpoint in {trained} (step 2) was written with {field}={was}",
                   f"this run has {now}")
    assert tree_digest(trained) == before


def test_resume_may_change_what_the_arrays_do_not_depend_on(trained, tmp_path, capsys):
    """Dropout, the learning rate and Partial FC's sample rate leave the checkpoint's arrays as they are: the
    resume goes on (a copy of the run, so the module's run stays at step 2)."""
    import shutil  # noqa: PLC0415
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    assert train(copy, "--config.total_steps=3", "--config.lr=0.01", "--config.model.dropout_rate=0.1",
                 "--config.head.sample_rate=0.5") == 0
    assert sorted(os.listdir(copy / "checkpoints")) == ["2", "3"]


def test_init_from_weights_of_another_width_is_refused_before_the_workdir_exists(trained, tmp_path, capsys):
    workdir = tmp_path / "finetune"
    assert train(workdir, "--init-from", str(trained), "--config.model.embedding_size=32") == 1
    line = one_error_line(capsys, f"--init-from {trained}: params/", "expects", "embedding_size=32")
    assert "of shape" in line and "(16" in line and "32)" in line, line
    assert not workdir.exists()


def test_init_from_another_architecture_names_a_missing_leaf(trained, tmp_path, capsys):
    workdir = tmp_path / "finetune"
    assert train(workdir, "--init-from", str(trained), "--config.model.arch=ir_18", "--config.model.width=8",
                 "--config.data.image_size=112") == 1
    one_error_line(capsys, f"--init-from {trained}: ", "arch='ir_18'", "missing")
    assert not workdir.exists()


def test_no_validation_set_found_is_refused_before_the_workdir_exists(tmp_path, capsys):
    workdir = tmp_path / "run"
    bins = tmp_path / "bins"
    bins.mkdir()
    assert train(workdir, "--config.evals.verification.every_epochs=1",
                 f"--config.evals.verification.bin_dir={bins}") == 1
    one_error_line(capsys, "config.evals.verification: no *.bin found in", str(bins),
                   "every_epochs=0")
    assert not workdir.exists()
    assert train(workdir, "--config.evals.verification.every_epochs=1",
                 f"--config.evals.verification.bin_dir={tmp_path / 'nowhere'}") == 1
    one_error_line(capsys, "config.evals.verification.bin_dir=", "directory not found")
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
    assert train(trained, "--config.model.embedding_size=32", "--config.total_steps=4") == 1
    one_error_line(capsys, f"checkpoint {trained}/checkpoints (step 2): ", "is of shape", "this run's configuration "
                   "expects of shape")
    assert tree_digest(trained) == before
