"""THE trainer builder: config + mesh -> model, sharded state, shardings and the jitted step.

The builders read the fields of a checked config (``adaface_jax.train.config.check_config``) and check
nothing themselves; a plain attribute mapping with the same fields works too (hosts without ml_collections).

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
from adaface_jax.models import build_model
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


def stat_groups(config, num_devices: int) -> int:
    """Groups of the batch with their own BatchNorm/AdaFace statistics: one (the global batch) or, with
    ``per_device_stats``, one per device as the original's DDP."""
    return num_devices if config.per_device_stats else 1


def loss_scale_config(config) -> Optional[ls.LossScaleConfig]:
    """GradScaler settings for float16 compute (``config.loss_scale``), None for float32 and bfloat16."""
    return ls.LossScaleConfig.from_config(config) if config.precision == "float16" else None


def build_backbone(config, num_devices: int = 1, *, groups: Optional[int] = None, cpu_backward: bool = False):
    """The backbone of ``config.model`` in ``config.precision``; ``groups`` defaults to
    ``stat_groups(config, num_devices)``; ``cpu_backward``: the IResNet's backward rewrites for XLA:CPU
    (``compile_options.cpu_backward``)."""
    groups = groups or stat_groups(config, num_devices)
    m = config.model
    kwargs = dict(dtype=jnp.dtype(config.precision), bn_groups=groups, embedding_size=m.embedding_size)
    if m.arch != "tiny":
        kwargs.update(dropout_rate=m.dropout_rate, width=m.width, input_size=config.data.image_size,
                      cpu_backward=cpu_backward)
    return build_model(m.arch, **kwargs)


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


def step_config(config, mesh: Mesh, schedule=None, groups: Optional[int] = None) -> StepConfig:
    groups = groups or stat_groups(config, mesh.devices.size)
    return StepConfig(head=config.head, num_classes=config.num_classes, head_num_groups=groups,
                      accum_steps=config.accum_steps,
                      lr_fn=schedule, embedding_sharding=parallel.embedding_sharding(mesh),
                      logits_sharding=parallel.logits_sharding(mesh), sample_rate=float(config.head.sample_rate), mesh=mesh,
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
    platform = mesh.devices.flat[0].platform
    if cpu_backward is None:
        cpu_backward = compile_options.cpu_backward(config.cpu_convolutions, platform)
    model = build_backbone(config, ndev, groups=groups, cpu_backward=cpu_backward)
    cfg = step_config(config, mesh, schedule, groups)
    options = compile_options.compiler_options(config.cpu_convolutions, platform)
    state, shardings = init_state(config, model, mesh, schedule, padded, abstract=abstract)
    step = parallel.jit_sharded(make_train_step(model, cfg), mesh, shardings, compiler_options=options)
    return Trainer(mesh=mesh, model=model, eval_model=build_backbone(config, 1), state=state, shardings=shardings,
                   step=step, schedule=schedule, step_config=cfg, padded_classes=padded)
