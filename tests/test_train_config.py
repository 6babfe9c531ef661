"""Recipes, --config overrides and configuration errors raised before anything compiles."""
import glob
import os

import pytest

from adaface_jax.errors import InputError
from adaface_jax.train.config_io import apply_overrides, load_config, split_override_args
from adaface_jax.train.loop import ConfigError, read_data_manifest, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# Class counts of utils.get_num_class in the original (reference-behaviour §5.1).
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
        validate_config(c, 8, {"num_images": 10 * c.global_batch_size, "num_classes": c.num_classes})


def test_overrides_are_typed_and_unknown_fields_rejected():
    c = load_config(os.path.join(CONFIGS, "cpu_synthetic.py"))
    over, rest = split_override_args(["--workdir", "w", "--config.lr=0.5", "--config.lr_milestones", "3,7",
                                      "--config.half_precision=true", "--config.data.data_dir=/x",
                                      "--config.global_batch_size=32"])
    assert rest == ["--workdir", "w"]
    apply_overrides(c, over)
    assert (c.lr, tuple(c.lr_milestones), c.half_precision, c.data.data_dir, c.global_batch_size) == \
        (0.5, (3, 7), True, "/x", 32)
    with pytest.raises(InputError, match="--config.head.margin: unknown config field"):
        apply_overrides(c, {"head.margin": "0.3"})
    with pytest.raises(ValueError, match="--config.epochs='two': expected int"):
        apply_overrides(c, {"epochs": "two"})


@pytest.fixture()
def fake_dataset(tmp_path):
    import json  # noqa: PLC0415
    (tmp_path / "manifest.json").write_text(json.dumps({"num_images": 100, "num_classes": 16, "shards": []}))
    return tmp_path


def _cfg(**kw):
    c = load_config(os.path.join(CONFIGS, "cpu_synthetic.py"))
    for k, v in kw.items():
        node = c
        *parents, leaf = k.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def test_bad_configurations_name_the_field(fake_dataset, tmp_path):
    from data_pipeline.manifest import read_manifest  # noqa: PLC0415
    try:
        manifest = read_manifest(str(fake_dataset))
    except Exception:  # noqa: BLE001  (the manifest reader may want more keys: use ours)
        manifest = {"num_images": 100, "num_classes": 16}
    with pytest.raises(ConfigError, match=r"config.model.arch='ir_77' is unknown"):
        validate_config(_cfg(model__arch="ir_77"), 8, manifest)
    with pytest.raises(ConfigError, match=r"config.num_classes=10 but the dataset manifest .* num_classes=16"):
        validate_config(_cfg(num_classes=10), 8, manifest)
    with pytest.raises(ConfigError, match=r"config.global_batch_size=12 is not divisible by the device count 8"):
        validate_config(_cfg(global_batch_size=12), 8, manifest)
    with pytest.raises(ConfigError, match=r"config.head.name='sphereface' is unknown"):
        validate_config(_cfg(head__name="sphereface"), 8, manifest)
    with pytest.raises(ConfigError, match=r"config.data.data_dir='.*nowhere': directory not found"):
        read_data_manifest(_cfg(data__data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=r"config.data.data_dir=.*no dataset manifest"):
        read_data_manifest(_cfg(data__data_dir=str(tmp_path / "..")))
    validate_config(_cfg(), 8, manifest)  # the CPU config itself is fine


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


@pytest.mark.parametrize("field,value,match", [("arch", "ir_77", "unknown arch 'ir_77'"),
                                               ("width", 10, "width must be a positive multiple of 4, got 10")])
def test_bad_model_config_is_a_config_error_before_tracing(field, value, match):
    from adaface_jax.train.setup import build_backbone
    from configs.common import get_base_config

    config = get_base_config(arch="ir_18", num_classes=4)
    config.model[field] = value
    with pytest.raises(ConfigError, match=match):
        build_backbone(config)
