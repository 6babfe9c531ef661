"""Recipes, --config overrides and the one config check (``train.config.check_config``): defaults filled into
an older recipe, dropped keys, evaluators by name, the best-checkpoint metric, and each bad value refused in
one line before anything compiles."""
import copy
import glob
import os

import ml_collections
import pytest

from adaface_jax.errors import InputError
from adaface_jax.train.config import apply_overrides, check_config, default_config, load_config, split_override_args
from adaface_jax.train.loop import ConfigError, read_data_manifest
from tests.support import REPO as REPO_ROOT
from tests.support.train_fixtures import cpu_config

REPO = str(REPO_ROOT)
CONFIGS = os.path.join(REPO, "configs")

# Class counts of the original's utils.get_num_class.
RECIPES = {"ir50_ms1mv2": ("ir_50", 85742), "ir101_ms1mv2": ("ir_101", 85742), "ir50_ms1mv3": ("ir_50", 93431),
           "ir101_ms1mv3": ("ir_101", 93431), "ir50_webface4m": ("ir_50", 205990),
           "ir101_webface4m": ("ir_101", 205990), "ir50_webface12m": ("ir_50", 617970),
           "ir101_webface12m": ("ir_101", 617970), "ir18_casia": ("ir_18", 10572), "ir50_casia": ("ir_50", 10572),
           "ir18_vgg2": ("ir_18", 9131), "ir18_webface4m": ("ir_18", 205990)}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_files_hold_the_released_recipe(name):
    c = load_config(os.path.join(CONFIGS, f"{name}.py"))
    arch, classes = RECIPES[name]
    assert (c.model.arch, c.num_classes) == (arch, classes)
    assert (c.global_batch_size, c.epochs, tuple(c.lr_milestones), c.lr, c.lr_gamma) == (512, 26, (12, 20, 24), 0.1, 0.1)
    assert (c.head.name, c.head.m, c.head.h, c.head.s, c.head.t_alpha) == ("adaface", 0.4, 0.333, 64.0, 0.01)
    assert (c.momentum, c.weight_decay) == (0.9, 5e-4)
    assert (c.data.crop_prob, c.data.lowres_prob, c.data.photometric_prob) == (0.2, 0.2, 0.2)
    doc = open(os.path.join(CONFIGS, f"{name}.py")).read()
    assert f"--config configs/{name}.py" in doc


def test_every_config_file_loads_and_validates():
    files = sorted(glob.glob(os.path.join(CONFIGS, "*.py")))
    names = {os.path.basename(p)[:-3] for p in files}
    assert set(RECIPES) | {"cpu_synthetic"} <= names
    for path in files:
        if os.path.basename(path) in ("__init__.py", "common.py"):
            continue
        c = load_config(path)
        checked = check_config(c, num_devices=8, process_count=1,
                               manifest={"num_images": 10 * c.global_batch_size, "num_classes": c.num_classes})
        assert checked.to_dict() == c.to_dict()  # a current recipe has every field: nothing to fill


def test_overrides_are_typed_and_unknown_fields_rejected():
    c = load_config(os.path.join(CONFIGS, "cpu_synthetic.py"))
    over, rest = split_override_args(["--workdir", "w", "--config.lr=0.5", "--config.lr_milestones", "3,7",
                                      "--config.precision=float16", "--config.data.data_dir=/x",
                                      "--config.global_batch_size=32"])
    assert rest == ["--workdir", "w"]
    apply_overrides(c, over)
    assert (c.lr, tuple(c.lr_milestones), c.precision, c.data.data_dir, c.global_batch_size) == \
        (0.5, (3, 7), "float16", "/x", 32)
    with pytest.raises(InputError, match="--config.head.margin: unknown config field"):
        apply_overrides(c, {"head.margin": "0.3"})
    with pytest.raises(InputError, match=r"^--config.half_precision: no longer a config field; set "
                                         r"config.precision='float32'\|'bfloat16'\|'float16' instead"):
        apply_overrides(c, {"half_precision": "true"})
    with pytest.raises(ValueError, match="--config.epochs='two': expected int"):
        apply_overrides(c, {"epochs": "two"})


@pytest.fixture()
def fake_dataset(tmp_path):
    import json  # noqa: PLC0415
    (tmp_path / "manifest.json").write_text(json.dumps({"num_images": 100, "num_classes": 16, "shards": []}))
    return tmp_path


def _check(config, manifest=None, num_devices=8, process_count=1):
    return check_config(config, num_devices=num_devices, process_count=process_count, manifest=manifest)


def test_bad_configurations_name_the_field(fake_dataset, tmp_path):
    from data_pipeline.manifest import read_manifest  # noqa: PLC0415
    try:
        manifest = read_manifest(str(fake_dataset))
    except Exception:  # noqa: BLE001  (the manifest reader may want more keys: use ours)
        manifest = {"num_images": 100, "num_classes": 16}
    bad = {  # field=value -> the start of its one error line
        "model__arch='ir_77'": r"config.model.arch='ir_77' is unknown; expected one of \[",
        "model__width=10": r"config.model \(arch='ir_18', width=10\): width must be a positive multiple of 4, got 10",
        "num_classes=10": r"config.num_classes=10 but the dataset manifest .* num_classes=16",
        "global_batch_size=12": r"config.global_batch_size=12 is not divisible by the device count 8",
        "head__name='sphereface'": r"config.head.name='sphereface' is unknown",
        "head__sample_rate=1.5": r"config.head.sample_rate=1.5: expected 0 < sample_rate <= 1",
        "precision='fp8'": r"config.precision='fp8' is unknown; expected one of \['bfloat16', 'float16', 'float32'\]",
        "cpu_convolutions='onednn'": r"config.cpu_convolutions='onednn': expected one of \('eigen', 'xla_default'\)",
        "data__source='folder'": r"config.data.source='folder': expected 'tfrecord' or 'random'",
        "data__num_streams=0": r"config.data.num_streams=0: expected a positive integer",
        "data__max_bad_records=-1": r"config.data.max_bad_records=-1: expected a count >= 0",
        "accum_steps=3": r"config.accum_steps=3 must divide the per-device batch 2",
        "log_every=0": r"config.log_every=0: expected an integer >= 1",
        "evals__verification__max_pairs=-1": r"config.evals.verification.max_pairs=-1: expected a count >= 0",
        "evals__verification__every_epochs=-1": r"config.evals.verification \(every_epochs=-1, batch_size=32\)",
        "checkpoint__best_mode='highest'": r"config.checkpoint.best_mode='highest': expected 'max' or 'min'",
        "checkpoint__best_metric='val/lfw_acc'": r"config.checkpoint.best_metric='val/lfw_acc' is not logged by the "
                                                 r"enabled evaluators; expected one of \['val/mean_acc'\]",
    }
    for assignment, match in bad.items():
        key, value = assignment.split("=", 1)
        with pytest.raises(ConfigError, match="^" + match):
            _check(cpu_config(**{key: eval(value)}), manifest)
    with pytest.raises(ConfigError, match=r"config.data.data_dir='.*nowhere': directory not found"):
        read_data_manifest(cpu_config(data__data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=r"config.data.data_dir=.*no dataset manifest"):
        read_data_manifest(cpu_config(data__data_dir=str(tmp_path / "..")))
    _check(cpu_config(), manifest)  # the CPU config itself is fine
    # A best metric no enabled evaluator logs is only an error while some evaluator runs.
    _check(cpu_config(checkpoint__best_metric="val/lfw_acc", evals__verification__every_epochs=0), manifest)


def test_a_process_count_must_divide_the_batch_and_the_input_streams():
    c = cpu_config(global_batch_size=48)  # 16 streams (gcd of 64 and 48)
    with pytest.raises(ConfigError, match=r"^config.data.num_streams=64: the 16 input streams .* cannot be split "
                                          r"over 3 processes; use a process count that divides 16"):
        _check(c, num_devices=6, process_count=3)
    _check(c, num_devices=8, process_count=4)
    c.data.source = "random"  # no streams: only the batch must split over the processes
    with pytest.raises(ConfigError, match=r"^config.global_batch_size=48 is not divisible by the process count 5"):
        _check(c, num_devices=1, process_count=5)


def _older_recipe():
    """A recipe written before the fields added since: no model.width, head.sample_rate, loss_scale,
    cpu_convolutions, data.num_streams / max_bad_records, evaluator type, or best-checkpoint fields."""
    c = cpu_config()
    del c["loss_scale"], c["cpu_convolutions"], c.model["width"], c.head["sample_rate"]
    del c.data["num_streams"], c.data["max_bad_records"], c.evals.verification["type"]
    del c.checkpoint["best_metric"], c.checkpoint["best_mode"]
    return c


def test_check_fills_an_older_recipe_with_the_defaults_and_leaves_it_unchanged():
    old = _older_recipe()
    before = copy.deepcopy(old.to_dict())
    checked = _check(old)
    assert old.to_dict() == before
    defaults = default_config()
    # Every field a builder reads is there, with the one default (the released recipe's where it has one).
    assert checked.model.width == 64 and checked.head.sample_rate == 1.0 and checked.cpu_convolutions == "eigen"
    assert (checked.loss_scale.init, checked.loss_scale.growth_interval, checked.loss_scale.growth_factor,
            checked.loss_scale.backoff_factor) == (2.0 ** 16, 2000, 2.0, 0.5)  # torch GradScaler's defaults
    assert checked.data.max_bad_records == defaults.data.max_bad_records == 100
    assert checked.data.num_streams == 64
    assert checked.evals.verification.type == "verification"  # the name is the type when none is given
    assert (checked.checkpoint.best_metric, checked.checkpoint.best_mode) == ("val/mean_acc", "max")
    assert checked.evals.verification.max_pairs == 100  # the recipe's own values are kept
    assert _check(checked).to_dict() == checked.to_dict()  # checking a checked config changes nothing
    # A config with no evaluators section gets the default one; an empty one stays empty (no evaluator).
    del old["evals"]
    assert set(_check(old).evals) == {"verification"}
    old.evals = ml_collections.ConfigDict()
    assert set(_check(old).evals) == set()


@pytest.mark.parametrize("key,hint", [("half_precision", "set config.precision='float32'|'bfloat16'|'float16' "
                                                         "instead (half_precision=True meant 'bfloat16'"),
                                      ("debug_step_delay_s", "it was a test hook; a test slows a run with "
                                                             "train(..., after_step=...)")])
def test_a_dropped_key_is_one_line_naming_what_to_do(key, hint, tmp_path, capsys):
    c = cpu_config()
    c[key] = 0.5 if key == "debug_step_delay_s" else True
    with pytest.raises(ConfigError) as e:
        _check(c)
    assert str(e.value) == f"config.{key}: no longer a config field; " + str(e.value).split("; ", 1)[1]
    assert hint in str(e.value)
    # Through the CLI, from a recipe file that still sets it: one line, nothing written.
    from tests.support.cli_fixtures import fail  # noqa: PLC0415
    recipe = tmp_path / "old_recipe.py"
    recipe.write_text("from configs.cpu_synthetic import get_config as base\n\n\ndef get_config():\n"
                      f"    c = base()\n    c.{key} = {c[key]!r}\n    return c\n")
    fail(capsys, ["train", "--config", str(recipe), "--workdir", str(tmp_path / "w"), "--config.data.source=random",
                  "--config.data.num_images=64"], f"config.{key}: no longer a config field", hint)
    assert not (tmp_path / "w").exists()


def test_unknown_fields_are_refused_but_another_tools_section_is_kept():
    c = cpu_config()
    c.head.margin = 0.3
    with pytest.raises(ConfigError, match=r"^config.head.margin: unknown config field \(known here: \['h', 'm',"):
        _check(c)
    c = cpu_config()
    c.lr_milestone = (3,)
    with pytest.raises(ConfigError, match=r"^config.lr_milestone: unknown config field"):
        _check(c)
    c = cpu_config()
    del c["model"]
    c.model = "ir_50"  # a recipe that wrote the arch where the section goes
    with pytest.raises(ConfigError, match=r"^config.model='ir_50': expected a section with fields \["):
        _check(c)
    c = cpu_config()
    c.study = ml_collections.ConfigDict({"steps": 3})  # e.g. the paper-in-miniature study's settings
    assert _check(c).study.steps == 3


class _NormProbe:
    """A second evaluator type for the registry tests: the mean feature norm of fixed images."""

    CONFIG_DEFAULTS = {"every_epochs": 1, "batch_size": 8, "num_images": 4}

    def __init__(self, images):
        self.images = images

    @classmethod
    def check_spec(cls, spec, where):
        if spec.num_images < 1:
            raise ConfigError(f"{where}.num_images={spec.num_images}: expected >= 1")

    @classmethod
    def metric_names(cls, spec):
        return ("val/probe_norm",)


def test_evaluators_by_name_type_and_the_best_metric(monkeypatch):
    from evaluation import evaluators  # noqa: PLC0415
    c = cpu_config()
    c.evals.hq = ml_collections.ConfigDict({"type": "ijb", "every_epochs": 1})
    with pytest.raises(ConfigError, match=r"^config.evals.hq.type='ijb': unknown evaluator type; expected one of "
                                          r"\['verification'\]$"):
        _check(c)
    c = cpu_config()
    c.evals.lfw = ml_collections.ConfigDict({"every_epochs": 1})  # no type: the name is taken for it
    with pytest.raises(ConfigError, match=r"^config.evals.lfw.type='lfw': unknown evaluator type"):
        _check(c)

    monkeypatch.setitem(evaluators.EVALUATORS, "norm_probe", _NormProbe)
    c = cpu_config()
    c.evals.probe = ml_collections.ConfigDict({"type": "norm_probe", "every_epochs": 2})
    c.checkpoint.best_metric, c.checkpoint.best_mode = "val/probe_norm", "min"
    checked = _check(c)
    assert checked.evals.probe.to_dict() == {"type": "norm_probe", "every_epochs": 2, "batch_size": 8,
                                             "num_images": 4}
    assert checked.evals.verification.type == "verification"
    checked.evals.probe.num_images = 0
    with pytest.raises(ConfigError, match=r"^config.evals.probe.num_images=0: expected >= 1"):
        _check(checked)
    c.evals.probe.stride = 2
    with pytest.raises(ConfigError, match=r"^config.evals.probe.stride: unknown config field"):
        _check(c)
    # Two enabled evaluators may not log the same metric; a disabled one logs nothing.
    c = cpu_config()
    c.evals.second = ml_collections.ConfigDict({"type": "verification", "every_epochs": 3})
    with pytest.raises(ConfigError, match=r"^config.evals.verification and config.evals.second both log "
                                          r"'val/mean_acc'"):
        _check(c)
    c.evals.second.every_epochs = 0
    _check(c)
def test_cli_reports_bad_configuration_before_compiling(tmp_path, capsys):
    from adaface_jax.cli import main  # noqa: PLC0415
    rc = main(["train", "--config", os.path.join(CONFIGS, "cpu_synthetic.py"), "--workdir", str(tmp_path / "w"),
               "--config.data.data_dir", str(tmp_path / "missing")])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("adaface-jax train: error: config.data.data_dir") and err.count("\n") == 1
    rc = main(["train", "--config", os.path.join(CONFIGS, "cpu_synthetic.py"), "--workdir", str(tmp_path / "w"),
               "--config.nope=1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("adaface-jax train: error: --config.nope") and err.count("\n") == 1
