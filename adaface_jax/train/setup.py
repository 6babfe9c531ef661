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

from adaface_jax import parallel
from adaface_jax.models import build_model
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


def compute_dtype(config):
    return jnp.bfloat16 if config.get("half_precision", False) else jnp.float32


def stat_groups(config, num_devices: int) -> int:
    """Groups of the batch with their own BatchNorm/AdaFace statistics: one (the global batch) or, with
    ``per_device_stats``, one per device as the original's DDP."""
    return num_devices if config.per_device_stats else 1


def build_backbone(config, num_devices: int = 1, *, groups: Optional[int] = None):
    """The backbone of ``config.model``; ``groups`` defaults to ``stat_groups(config, num_devices)``."""
    groups = groups or stat_groups(config, num_devices)
    m = config.model
    kwargs = dict(dtype=compute_dtype(config), bn_groups=groups, embedding_size=m.embedding_size)
    if m.arch != "tiny":
        kwargs.update(dropout_rate=m.dropout_rate, width=m.get("width", 64))
    return build_model(m.arch, **kwargs)


def make_schedule(config, steps_per_epoch: int):
    return optim.lr_schedule(config.lr, steps_per_epoch, tuple(config.lr_milestones), config.lr_gamma,
                             warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)))


def init_state(config, model, mesh: Mesh, schedule, padded_classes: int):
    """A fresh TrainState created directly in its shardings -> (state, shardings)."""
    rng = jax.random.PRNGKey(config.seed)

    def init(rng):
        p, bs, hs = init_variables(model, rng, config.num_classes, padded_classes=padded_classes,
                                   head=config.head.name, image_size=config.data.image_size,
                                   embedding_size=config.model.embedding_size)
        tx = optim.make_optimizer(schedule, p, bs, momentum=config.momentum, weight_decay=config.weight_decay)
        return create_train_state(p, bs, hs, tx, jax.random.fold_in(rng, 2))

    return parallel.create_sharded(init, mesh, rng)


def step_config(config, mesh: Mesh, schedule=None, groups: Optional[int] = None) -> StepConfig:
    groups = groups or stat_groups(config, mesh.devices.size)
    return StepConfig(head=config.head, num_classes=config.num_classes, head_num_groups=groups,
                      accum_steps=config.accum_steps,
                      lr_fn=schedule, embedding_sharding=parallel.embedding_sharding(mesh),
                      logits_sharding=parallel.logits_sharding(mesh))


def build_trainer(config, mesh: Optional[Mesh] = None, *, steps_per_epoch: int,
                  padded_classes: Optional[int] = None, groups: Optional[int] = None) -> Trainer:
    """Everything a training run compiles, for ``config`` on ``mesh`` (default: every device).

    ``steps_per_epoch`` sets the LR schedule's epochs; ``padded_classes`` overrides the kernel width
    (a resumed run keeps the one its checkpoint was written with); ``groups`` overrides the
    statistics groups (e.g. an 8-GPU per-device run reproduced on fewer devices)."""
    mesh = mesh if mesh is not None else parallel.make_mesh()
    ndev = mesh.devices.size
    groups = groups or stat_groups(config, ndev)
    padded = padded_classes or parallel.padded_num_classes(config.num_classes, ndev)
    schedule = make_schedule(config, steps_per_epoch)
    model = build_backbone(config, ndev, groups=groups)
    state, shardings = init_state(config, model, mesh, schedule, padded)
    cfg = step_config(config, mesh, schedule, groups)
    step = parallel.jit_sharded(make_train_step(model, cfg), mesh, shardings)
    return Trainer(mesh=mesh, model=model, eval_model=build_backbone(config, 1), state=state, shardings=shardings,
                   step=step, schedule=schedule, step_config=cfg, padded_classes=padded)
