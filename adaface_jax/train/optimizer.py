"""The original optimizer: SGD(momentum 0.9) with coupled L2 decay on every non-BatchNorm parameter.

PyTorch (``configure_optimizers``)::

    g' = g + wd * p          (wd = 5e-4 for conv/linear weight+bias, PReLU slopes, head kernel; 0 for BN)
    buf = 0.9 * buf + g'     (buf = g' on the first step)
    p  -= lr * buf

which is ``optax.chain(add_decayed_weights(wd, mask), sgd(lr, momentum=0.9))``: optax's trace starts
from zero so its first step also gives ``buf = g'``.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util


def decay_mask(params: Any, batch_stats: Any) -> Any:
    """True for every parameter that gets weight decay, False for BatchNorm scale/bias.

    A parameter belongs to a BatchNorm when its module also owns ``batch_stats`` (mean/var): this
    finds every BN of the IResNet (and of any Flax model using BN) without a list of names.
    """
    bn_modules = {path[:-1] for path in traverse_util.flatten_dict(batch_stats or {})}
    flat = traverse_util.flatten_dict(params)

    def is_decayed(path):
        # path = ('backbone', <module path...>, leaf); batch_stats paths lack the 'backbone' prefix.
        module = path[1:-1] if path and path[0] == "backbone" else path[:-1]
        return module not in bn_modules

    return traverse_util.unflatten_dict({k: is_decayed(k) for k in flat})


def lr_schedule(base_lr: float, steps_per_epoch: int, milestones: Sequence[int] = (), gamma: float = 0.1,
                warmup_steps: int = 0, warmup_init: float = 0.0):
    """MultiStepLR stepped once per epoch, converted to optimizer steps, with optional linear warmup.

    ``lr(step) = base_lr * gamma ** #{m in milestones : step >= m * steps_per_epoch}``; during the first
    ``warmup_steps`` steps the value is multiplied by a ramp from ``warmup_init/base_lr`` to 1.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    boundaries = np.asarray(sorted(int(m) * steps_per_epoch for m in milestones), np.int32)  # static

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        n_passed = jnp.sum(count >= boundaries) if boundaries.size else 0
        lr = base_lr * jnp.power(jnp.float32(gamma), n_passed)
        if warmup_steps > 0:
            frac = jnp.minimum(count.astype(jnp.float32) / warmup_steps, 1.0)
            lr = lr * (warmup_init / base_lr + (1.0 - warmup_init / base_lr) * frac)
        return lr

    return schedule


def make_optimizer(schedule, params: Any, batch_stats: Any, *, momentum: float = 0.9,
                   weight_decay: float = 5e-4, nesterov: bool = False) -> optax.GradientTransformation:
    """``chain(add_decayed_weights(wd, mask), sgd(schedule, momentum))`` with the BN-exclusion mask."""
    mask = decay_mask(params, batch_stats)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
    )
