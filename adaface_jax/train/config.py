"""The training configuration, in one place: every field's default (``default_config``), the recipe loader
with ``--config.a.b=value`` overrides, and ``check_config``, the one check of a configuration.

A recipe (``configs/*.py``) starts from ``default_config()`` and sets what differs. ``check_config`` fills the
fields an older recipe lacks with their defaults, refuses dropped keys and unknown fields, checks every value
against the run (device and process counts, the dataset's manifest) and returns the checked copy; the
builders (``train.setup``, the loop, the evaluators) read its fields directly.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import sys
from typing import Optional

import ml_collections

from adaface_jax import io
from adaface_jax.errors import ConfigError, InputError
from data_pipeline.streams import effective_streams

PRECISIONS = ("float32", "bfloat16", "float16")  # backbone compute; parameters, head and loss stay float32
DATA_SOURCES = ("tfrecord", "random")
BEST_MODES = ("max", "min")

# Keys that recipes no longer carry: a config that sets one is refused with what to do instead.
DROPPED_KEYS = {
    "half_precision": "set config.precision='float32'|'bfloat16'|'float16' instead (half_precision=True meant "
                      "'bfloat16', False 'float32')",
    "debug_step_delay_s": "it was a test hook; a test slows a run with train(..., after_step=...)",
}


def default_config() -> ml_collections.ConfigDict:
    """Every field of a training config with its default: the released AdaFace recipe
    (scripts/run_ir50_ms1mv2.sh of the original) for an ir_50; a recipe sets the dataset's fields."""
    from adaface_jax.train.loss_scale import LossScaleConfig  # noqa: PLC0415  (the scaler owns its defaults)
    from evaluation.evaluators import EVALUATORS  # noqa: PLC0415  (each evaluator type owns its fields)

    c = ml_collections.ConfigDict()
    c.seed = 42
    c.num_classes = 0            # identities in the training set; must equal the dataset manifest's
    c.global_batch_size = 512    # over every device of every process
    c.accum_steps = 1            # micro-batches per step (gradient accumulation)
    c.epochs = 26
    c.total_steps = 0            # > 0 overrides epochs * steps_per_epoch
    c.lr = 0.1
    c.lr_milestones = (12, 20, 24)  # epochs where the LR is multiplied by lr_gamma
    c.lr_gamma = 0.1
    c.warmup_epochs = 0.0
    c.momentum = 0.9
    c.weight_decay = 5e-4        # coupled L2 on everything but BatchNorm
    c.precision = "bfloat16"     # backbone compute: one of PRECISIONS (float16 adds dynamic loss scaling)
    c.per_device_stats = False   # True: BN and AdaFace statistics per device (the original's DDP)
    c.max_skipped_in_row = 20    # stop after this many consecutive non-finite steps (checked at log steps)
    c.log_every = 50             # steps between metrics.jsonl / TensorBoard lines
    c.progress = True            # the progress bar (process 0)
    c.sample_grid = True         # training_samples.png: a grid of augmented images at step 0
    # CPU backend only: XLA's Eigen convolution kernels and the backbone's CPU backward rewrites, or
    # 'xla_default' (YNNPACK kernels, autodiff's backward); see adaface_jax.compile_options
    c.cpu_convolutions = "eigen"

    c.model = ml_collections.ConfigDict()
    c.model.arch = "ir_50"       # adaface_jax.models.MODEL_NAMES
    c.model.embedding_size = 512
    c.model.width = 64           # first-stage channels; 64 in every released model (narrower: CPU demos)
    c.model.dropout_rate = 0.4

    c.head = ml_collections.ConfigDict()
    c.head.name = "adaface"      # adaface_jax.heads.HEADS
    c.head.m = 0.4
    c.head.h = 0.333
    c.head.s = 64.0
    c.head.t_alpha = 0.01
    c.head.sample_rate = 1.0     # Partial FC: < 1 samples this fraction of each device's classes (+ the batch's)

    # Dynamic loss scaling, used only with precision='float16': init, growth_interval, growth_factor,
    # backoff_factor, with torch GradScaler's defaults (train.loss_scale.LossScaleConfig)
    c.loss_scale = ml_collections.ConfigDict(dataclasses.asdict(LossScaleConfig()))

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfrecord"   # 'random' = noise batches (benchmarks, plumbing tests)
    c.data.data_dir = ""         # a prepared dataset (adaface-jax prepare / synthesize), local or gs://
    c.data.num_images = 0        # only for source='random'
    c.data.image_size = 112
    c.data.augment = True
    c.data.crop_prob = 0.2
    c.data.lowres_prob = 0.2
    c.data.photometric_prob = 0.2
    c.data.flip_prob = 0.5
    c.data.num_streams = 64      # logical input streams (gcd with the global batch is used); the process count
                                 # must divide it. Fixes the data order: keep it when resuming on another topology
    c.data.max_bad_records = 100  # undecodable training records replaced before the run stops (see `adaface-jax check`)

    # Evaluators by name (evaluation.evaluators.EVALUATORS): each has a `type` (the name when absent), runs
    # every `every_epochs` epochs (0: never) and embeds `batch_size` images at a time.
    c.evals = ml_collections.ConfigDict()
    c.evals.verification = evaluator_spec("verification", EVALUATORS)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 2000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.best_metric = "val/mean_acc"  # an evaluator's metric that picks best/ ('' keeps no best)
    c.checkpoint.best_mode = "max"             # 'max' or 'min'
    return c


def evaluator_spec(type_name: str, registry=None) -> ml_collections.ConfigDict:
    """``config.evals.<name>`` for an evaluator of ``type_name`` with its type's default fields."""
    if registry is None:
        from evaluation.evaluators import EVALUATORS as registry  # noqa: PLC0415
    return ml_collections.ConfigDict({"type": type_name, **registry[type_name].CONFIG_DEFAULTS})


def load_config(path: str) -> ml_collections.ConfigDict:
    """Import ``path`` and call its ``get_config()``; ``path:arg`` calls ``get_config("arg")`` (the
    ml_collections config_flags convention, e.g. ``configs/paper_miniature.py:small``)."""
    arg = None
    if "://" in path:
        raise InputError(f"--config {path}: a recipe is a local Python file (configs/*.py); copy it from the bucket "
                         "first")
    io.check_path(path, "--config")  # a URL typed with one slash ('gs:/b/x') is refused, not looked up locally
    if not io.isfile(path) and ":" in path:
        path, arg = path.rsplit(":", 1)
    if not io.isfile(path):
        raise InputError(f"--config {path}: file not found (expected a configs/*.py recipe)")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if repo_root not in sys.path:  # recipes import configs.common
        sys.path.insert(0, repo_root)
    spec = importlib.util.spec_from_file_location(f"_adaface_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise InputError(f"--config {path}: not a Python file; expected a configs/*.py recipe defining get_config()")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a recipe is user input: report its error in one line
        raise InputError(f"--config {path}: could not be loaded ({type(e).__name__}: {e})") from e
    if not hasattr(module, "get_config"):
        raise InputError(f"--config {path}: defines no get_config()")
    try:
        config = module.get_config() if arg is None else module.get_config(arg)
    except (TypeError, ValueError) as e:  # e.g. an unknown setting name
        raise InputError(f"--config {path}{'' if arg is None else ':' + arg}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise InputError(f"--config {path}: get_config() returned {type(config).__name__}, expected a ConfigDict")
    return config


def _parse_like(old, text: str, field: str):
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"--config.{field}={text!r}: expected a boolean")
    try:
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
        if isinstance(old, (tuple, list)):
            items = [t for t in text.replace("(", "").replace(")", "").split(",") if t.strip()]
            kind = type(old[0]) if old else str
            return tuple(_parse_like(kind(), t.strip(), field) if kind is not str else t.strip() for t in items)
    except ValueError as e:
        raise InputError(f"--config.{field}={text!r}: expected {type(old).__name__} ({e})") from None
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """``{'data.data_dir': '/x', 'lr': '0.05'}`` -> config with those fields set (unknown fields are an error)."""
    for dotted, text in overrides.items():
        node = config
        parts = dotted.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise InputError(f"--config.{dotted}: config has no section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            if dotted in DROPPED_KEYS:
                raise InputError(f"--config.{dotted}: no longer a config field; {DROPPED_KEYS[dotted]}")
            raise InputError(f"--config.{dotted}: unknown config field (known here: {sorted(node.keys())})")
        if isinstance(node[parts[-1]], ml_collections.ConfigDict):
            raise InputError(section_value_message(dotted, text, node[parts[-1]]))
        try:
            node[parts[-1]] = _parse_like(node[parts[-1]], text, dotted)
        except TypeError as e:  # ml_collections' type check of the field
            raise InputError(f"--config.{dotted}={text!r}: {e}") from None
    return config


# The field a user usually means when they write a value onto a whole section.
SECTION_MAIN_FIELD = {"model": "arch", "head": "name", "data": "data_dir", "checkpoint": "every_steps",
                      "evals": "verification.sets", "loss_scale": "init"}


def section_value_message(dotted: str, text: str, section: ml_collections.ConfigDict) -> str:
    """``--config.model=ir_50``: one line saying that ``model`` is a section and which key to set instead."""
    last = dotted.rsplit(".", 1)[-1]
    main = SECTION_MAIN_FIELD.get(last) if "." not in dotted else None
    hint = (f"did you mean --config.{dotted}.{main}={text}?" if main else
            f"set one of its fields: {', '.join(f'--config.{dotted}.{k}' for k in sorted(section.keys()))}")
    return f"--config.{dotted}={text!r}: config.{dotted} is a section, not a value; {hint}"


def split_override_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Pull ``--config.x=v`` / ``--config.x v`` out of argv; returns (overrides, the rest)."""
    overrides, rest, i = {}, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            key = a[len("--config."):]
            if "=" in key:
                key, val = key.split("=", 1)
            elif i + 1 < len(argv):
                i += 1
                val = argv[i]
            else:
                raise ValueError(f"{a}: missing value")
            overrides[key] = val
        else:
            rest.append(a)
        i += 1
    return overrides, rest


# ------------------------------------------------------------------------------------------------ the check

def check_config(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int,
                 manifest: Optional[dict] = None) -> ml_collections.ConfigDict:
    """The one check of a training config, before anything is built: returns a checked copy with the fields an
    older recipe lacks filled from ``default_config()``, or raises ConfigError naming the first bad field.

    ``num_devices`` / ``process_count``: the run's devices (all processes) and processes; ``manifest``: the
    dataset's manifest when there is one to compare with (``data.source='tfrecord'``)."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config: expected an ml_collections ConfigDict, got {type(config).__name__}")
    from evaluation.evaluators import EVALUATORS  # noqa: PLC0415

    checked = copy.deepcopy(config)
    with checked.unlocked():
        _fill_defaults(checked, default_config(), "config")
        for name in checked.evals.keys():
            spec, where = checked.evals[name], f"config.evals.{name}"
            if not isinstance(spec, ml_collections.ConfigDict):
                raise ConfigError(f"{where}={spec!r}: expected a section with the evaluator's type and fields")
            if "type" not in spec:  # big_vision's rule: the name is the type unless one is given
                spec.type = name
            if spec.type not in EVALUATORS:
                raise ConfigError(f"{where}.type={spec.type!r}: unknown evaluator type; expected one of "
                                  f"{sorted(EVALUATORS)}")
            _fill_defaults(spec, evaluator_spec(spec.type, EVALUATORS), where)
    _check_model(checked)
    _check_training(checked, num_devices, process_count, manifest)
    _check_evals(checked, EVALUATORS)
    return checked


def _fill_defaults(node, defaults, where: str) -> None:
    """Adds the fields of ``defaults`` that ``node`` lacks; refuses dropped keys and fields ``defaults`` does not
    have (a section unknown at the top level, such as the miniature's ``study``, belongs to another tool)."""
    for key in node.keys():
        dotted = f"{where}.{key}"[len("config."):]
        if dotted in DROPPED_KEYS:
            raise ConfigError(f"config.{dotted}: no longer a config field; {DROPPED_KEYS[dotted]}")
        if key not in defaults:
            if where == "config" and isinstance(node[key], ml_collections.ConfigDict):
                continue
            raise ConfigError(f"{where}.{key}: unknown config field (known here: {sorted(defaults.keys())})")
    for key in defaults.keys():
        default = defaults[key]
        if key not in node:
            node[key] = copy.deepcopy(default)
        elif isinstance(default, ml_collections.ConfigDict):
            if not isinstance(node[key], ml_collections.ConfigDict):
                raise ConfigError(f"{where}.{key}={node[key]!r}: expected a section with fields "
                                  f"{sorted(default.keys())}")
            if not (where == "config" and key == "evals"):  # evaluators are filled by their own type
                _fill_defaults(node[key], default, f"{where}.{key}")


def _check_model(c) -> None:
    from adaface_jax import compile_options, heads  # noqa: PLC0415
    from adaface_jax.models import ARCHS, MODEL_NAMES, stage_specs  # noqa: PLC0415

    m = c.model
    if m.arch not in MODEL_NAMES:
        raise ConfigError(f"config.model.arch={m.arch!r} is unknown; expected one of {sorted(MODEL_NAMES)}")
    if m.arch in ARCHS:
        try:
            stage_specs(ARCHS[m.arch]["num_layers"], m.width)
        except ValueError as e:  # a width that is not a positive multiple of 4
            raise ConfigError(f"config.model (arch={m.arch!r}, width={m.width}): {e}") from e
    if m.embedding_size < 1 or not 0.0 <= m.dropout_rate < 1.0:
        raise ConfigError(f"config.model (embedding_size={m.embedding_size}, dropout_rate={m.dropout_rate}): "
                          "expected embedding_size >= 1 and 0 <= dropout_rate < 1")
    if c.head.name not in heads.HEADS:
        raise ConfigError(f"config.head.name={c.head.name!r} is unknown; expected one of {sorted(heads.HEADS)}")
    if not 0.0 < float(c.head.sample_rate) <= 1.0:
        raise ConfigError(f"config.head.sample_rate={float(c.head.sample_rate)}: expected 0 < sample_rate <= 1")
    if c.precision not in PRECISIONS:
        raise ConfigError(f"config.precision={c.precision!r} is unknown; expected one of {sorted(PRECISIONS)}")
    if c.precision == "float16":
        from adaface_jax.train.loss_scale import LossScaleConfig  # noqa: PLC0415
        scale = LossScaleConfig.from_config(c)
        if not (scale.init > 0 and scale.growth_interval >= 1 and scale.growth_factor > 1
                and 0 < scale.backoff_factor < 1):
            raise ConfigError(f"config.loss_scale={dataclasses.asdict(scale)}: expected init > 0, growth_interval "
                              ">= 1, growth_factor > 1 and 0 < backoff_factor < 1")
    compile_options.check_cpu_convolutions(c.cpu_convolutions)


def _check_training(c, num_devices: int, process_count: int, manifest: Optional[dict]) -> None:
    d, batch = c.data, c.global_batch_size
    if d.source not in DATA_SOURCES:
        raise ConfigError(f"config.data.source={d.source!r}: expected 'tfrecord' or 'random'")
    if int(d.num_streams) < 1:
        raise ConfigError(f"config.data.num_streams={d.num_streams}: expected a positive integer")
    if int(d.max_bad_records) < 0:
        raise ConfigError(f"config.data.max_bad_records={d.max_bad_records}: expected a count >= 0")
    if batch <= 0 or batch % num_devices:
        raise ConfigError(f"config.global_batch_size={batch} is not divisible by the device count {num_devices}")
    if d.source == "tfrecord" and process_count > 1:
        streams = effective_streams(d.num_streams, batch)
        if streams % process_count:
            raise ConfigError(f"config.data.num_streams={d.num_streams}: the {streams} input streams (gcd of "
                              f"data.num_streams and global_batch_size={batch}) cannot be split over "
                              f"{process_count} processes; use a process count that divides {streams}")
    if batch % process_count:
        raise ConfigError(f"config.global_batch_size={batch} is not divisible by the process count {process_count}")
    if c.accum_steps < 1 or (batch // num_devices) % c.accum_steps:
        raise ConfigError(f"config.accum_steps={c.accum_steps} must divide the per-device batch "
                          f"{batch // num_devices}")
    if manifest is not None and int(manifest["num_classes"]) != c.num_classes:
        raise ConfigError(f"config.num_classes={c.num_classes} but the dataset manifest in {d.data_dir} has "
                          f"num_classes={manifest['num_classes']}")
    if c.num_classes <= 1:
        raise ConfigError(f"config.num_classes={c.num_classes} must be > 1")
    if c.per_device_stats and c.head.name == "adaface" and batch // num_devices < 2:
        raise ConfigError("config.per_device_stats needs at least 2 samples per device (unbiased std)")
    for field, value in (("log_every", c.log_every), ("checkpoint.every_steps", c.checkpoint.every_steps),
                         ("checkpoint.keep", c.checkpoint.keep)):
        if int(value) < 1:
            raise ConfigError(f"config.{field}={value}: expected an integer >= 1")


def _check_evals(c, registry) -> None:
    """Each evaluator's period and fields, and ``checkpoint.best_metric`` against the metrics the enabled ones log."""
    logged_by = {}
    for name in c.evals.keys():
        spec, where = c.evals[name], f"config.evals.{name}"
        if int(spec.every_epochs) < 0 or int(spec.batch_size) < 1:
            raise ConfigError(f"{where} (every_epochs={spec.every_epochs}, batch_size={spec.batch_size}): expected "
                              "every_epochs >= 0 (0: never) and batch_size >= 1")
        evaluator = registry[spec.type]
        evaluator.check_spec(spec, where)
        if spec.every_epochs > 0:
            for metric in evaluator.metric_names(spec):
                if metric in logged_by:
                    raise ConfigError(f"{where} and config.evals.{logged_by[metric]} both log {metric!r}; give one "
                                      "of them other metric names or every_epochs=0")
                logged_by[metric] = name
    best, mode = c.checkpoint.best_metric, c.checkpoint.best_mode
    if mode not in BEST_MODES:
        raise ConfigError(f"config.checkpoint.best_mode={mode!r}: expected 'max' or 'min'")
    if best and logged_by and best not in logged_by:
        raise ConfigError(f"config.checkpoint.best_metric={best!r} is not logged by the enabled evaluators; expected "
                          f"one of {sorted(logged_by)} ('' keeps no best checkpoint)")


def precision_of_saved_config(saved: dict) -> str:
    """The compute precision of a config saved in a checkpoint (a dict), including runs saved while the
    ``half_precision`` key was still read: True meant 'bfloat16' and False 'float32', also next to
    ``precision='bfloat16'``."""
    precision, half = saved.get("precision"), saved.get("half_precision")
    if not precision:
        return "bfloat16" if half else "float32"
    return "float32" if precision == "bfloat16" and half is False else precision
