"""THE trainer builder: config + mesh -> model, sharded state, shardings and the jitted step.

Used by the training loop, the tests, the benchmarks and the notebooks, so a run, a test and a
benchmark compile the same step. Data-parallel over the mesh's 'data' axis (what ``jax.pmap`` did,
written as ``jit`` over sharded arrays); the classifier kernel is sharded by class (see
``adaface_jax.parallel``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from adaface_jax import compile_options, parallel
from adaface_jax.errors import ConfigError
from adaface_jax.models import build_model, unit_strides
from adaface_jax.train import loss_scale as ls
from adaface_jax.train import optimizer as optim
from adaface_jax.train.state import TrainState, create_train_state, init_variables
from adaface_jax.train.step import StepConfig, make_train_step


@dataclasses.dataclass
class Trainer:
    """model: the train-mode backbone (BatchNorm statistics per device group when configured);
    eval_model: the same weights' eval-mode module (running statistics, no groups);
    state / shardings: the sharded TrainState and its shardings; step: jitted
    ``(state, global batch) -> (state, metrics)`` with the state donated; schedule: the LR schedule;
    padded_classes: kernel columns (num_classes rounded up to the device count)."""

    mesh: Mesh
    model: Any
    eval_model: Any
    state: TrainState
    shardings: Any
    step: Callable
    schedule: Callable
    step_config: StepConfig
    padded_classes: int


PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def precision(config) -> str:
    """The backbone's compute precision: ``config.precision`` ('float32' | 'bfloat16' | 'float16').

    The old boolean ``config.half_precision`` is still accepted: a config without ``precision`` gets
    'bfloat16' for True and 'float32' for False, and ``half_precision=False`` next to the recipe
    default ``precision='bfloat16'`` turns mixed precision off (as it did before).  Parameters, the
    head, the softmax and the loss are float32 in every case; float16 adds dynamic loss scaling."""
    p = config.get("precision", None)
    half = config.get("half_precision", None)
    if not p:
        return "bfloat16" if half else "float32"
    if p not in PRECISIONS:
        raise ConfigError(f"config.precision={p!r} is unknown; expected one of {sorted(PRECISIONS)}")
    if p == "bfloat16" and half is False:
        return "float32"
    return p


def compute_dtype(config):
    return PRECISIONS[precision(config)]


def loss_scale_config(config) -> Optional[ls.LossScaleConfig]:
    """GradScaler settings for float16 compute (``config.loss_scale``), None otherwise."""
    if precision(config) != "float16":
        return None
    cfg = ls.LossScaleConfig.from_config(config)
    if not (cfg.init > 0 and cfg.growth_interval >= 1 and cfg.growth_factor > 1 and 0 < cfg.backoff_factor < 1):
        raise ConfigError(f"config.loss_scale={dataclasses.asdict(cfg)}: expected init > 0, growth_interval >= 1, "
                            f"growth_factor > 1 and 0 < backoff_factor < 1")
    return cfg


def sample_rate(config) -> float:
    """Partial FC's ``config.head.sample_rate`` (default 1.0: the full softmax), checked."""
    r = float(config.head.get("sample_rate", 1.0))
    if not 0.0 < r <= 1.0:
        raise ConfigError(f"config.head.sample_rate={r}: expected 0 < sample_rate <= 1")
    return r


def stat_groups(config, num_devices: int) -> int:
    """Groups of the batch with their own BatchNorm/AdaFace statistics: one (the global batch) or, with
    ``per_device_stats``, one per device as the original's DDP."""
    return num_devices if config.per_device_stats else 1


def build_backbone(config, num_devices: int = 1, *, groups: Optional[int] = None, cpu_backward: bool = False):
    """The backbone of ``config.model``; ``groups`` defaults to ``stat_groups(config, num_devices)``;
    ``cpu_backward``: the IResNet's backward rewrites for XLA:CPU (``compile_options.cpu_backward``)."""
    groups = groups or stat_groups(config, num_devices)
    m = config.model
    kwargs = dict(dtype=compute_dtype(config), bn_groups=groups, embedding_size=m.embedding_size)
    if m.arch != "tiny":
        kwargs.update(dropout_rate=m.dropout_rate, width=m.get("width", 64), input_size=config.data.image_size,
                      cpu_backward=cpu_backward)
    try:
        model = build_model(m.arch, **kwargs)
        if m.arch != "tiny":
            unit_strides(model.num_layers, model.width)  # checks the width now rather than in the first trace
        return model
    except ValueError as e:  # an unknown arch, a width that is not a multiple of 4, ...
        raise ConfigError(f"config.model (arch={m.arch!r}, width={m.get('width', 64)}): {e}") from e


def make_schedule(config, steps_per_epoch: int):
    return optim.lr_schedule(config.lr, steps_per_epoch, tuple(config.lr_milestones), config.lr_gamma,
                             warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)))


def init_state(config, model, mesh: Mesh, schedule, padded_classes: int, *, abstract: bool = False):
    """A fresh TrainState created directly in its shardings -> (state, shardings).

    ``abstract``: the state as ``jax.ShapeDtypeStruct``s carrying their shardings, nothing allocated
    (to lower and compile the step, e.g. ``adaface-jax train --dry-run``)."""
    rng = jax.random.PRNGKey(config.seed)
    scale_cfg = loss_scale_config(config)

    def init(rng):
        p, bs, hs = init_variables(model, rng, config.num_classes, padded_classes=padded_classes,
                                   head=config.head.name, image_size=config.data.image_size,
                                   embedding_size=config.model.embedding_size)
        tx = optim.make_optimizer(schedule, p, bs, momentum=config.momentum, weight_decay=config.weight_decay)
        scale = ls.LossScaleState.create(scale_cfg) if scale_cfg is not None else None
        return create_train_state(p, bs, hs, tx, jax.random.fold_in(rng, 2), loss_scale=scale)

    if abstract:
        return parallel.abstract_sharded(init, mesh, rng)
    return parallel.create_sharded(init, mesh, rng)


def resolve_cpu_convolutions(config) -> str:
    """``config.cpu_convolutions`` ('eigen' by default; see ``adaface_jax.compile_options``), checked."""
    choice = config.get("cpu_convolutions", compile_options.DEFAULT_CPU_CONVOLUTIONS)
    return compile_options.check_cpu_convolutions(choice)


def step_config(config, mesh: Mesh, schedule=None, groups: Optional[int] = None) -> StepConfig:
    groups = groups or stat_groups(config, mesh.devices.size)
    return StepConfig(head=config.head, num_classes=config.num_classes, head_num_groups=groups,
                      accum_steps=config.accum_steps,
                      lr_fn=schedule, embedding_sharding=parallel.embedding_sharding(mesh),
                      logits_sharding=parallel.logits_sharding(mesh), sample_rate=sample_rate(config), mesh=mesh,
                      loss_scale=loss_scale_config(config))


def build_trainer(config, mesh: Optional[Mesh] = None, *, steps_per_epoch: int,
                  padded_classes: Optional[int] = None, groups: Optional[int] = None,
                  abstract: bool = False, cpu_backward: Optional[bool] = None) -> Trainer:
    """Everything a training run compiles, for ``config`` on ``mesh`` (default: every device).

    ``steps_per_epoch`` sets the LR schedule's epochs; ``padded_classes`` overrides the kernel width
    (a resumed run keeps the one its checkpoint was written with); ``groups`` overrides the
    statistics groups (e.g. an 8-GPU per-device run reproduced on fewer devices); ``abstract``: the
    state is shapes and shardings only (``trainer.step.lower(state, batch).compile()`` allocates nothing
    big); ``cpu_backward`` overrides whether the backbone takes its CPU backward rewrites (default: as
    ``compile_options.cpu_backward`` chooses for the config and the mesh's platform)."""
    mesh = mesh if mesh is not None else parallel.make_mesh()
    ndev = mesh.devices.size
    groups = groups or stat_groups(config, ndev)
    padded = padded_classes or parallel.padded_num_classes(config.num_classes, ndev)
    schedule = make_schedule(config, steps_per_epoch)
    cpu_convolutions, platform = resolve_cpu_convolutions(config), mesh.devices.flat[0].platform
    if cpu_backward is None:
        cpu_backward = compile_options.cpu_backward(cpu_convolutions, platform)
    model = build_backbone(config, ndev, groups=groups, cpu_backward=cpu_backward)
    cfg = step_config(config, mesh, schedule, groups)  # checks the config before anything is traced
    options = compile_options.compiler_options(cpu_convolutions, platform)
    state, shardings = init_state(config, model, mesh, schedule, padded, abstract=abstract)
    step = parallel.jit_sharded(make_train_step(model, cfg), mesh, shardings, compiler_options=options)
    return Trainer(mesh=mesh, model=model, eval_model=build_backbone(config, 1), state=state, shardings=shardings,
                   step=step, schedule=schedule, step_config=cfg, padded_classes=padded)
