"""Dynamic loss scaling for float16 compute (``torch.cuda.amp.GradScaler`` semantics).

float16 has 5 exponent bits: small gradients of the backbone's activations underflow to zero.  The
loss is multiplied by ``scale`` before differentiation and the gradients divided by it afterwards.
The scale adapts as GradScaler's ``update()``:

  * initial scale ``2**16``;
  * a step whose (unscaled) loss or gradients hold inf/NaN is skipped (params, optimizer and
    statistics unchanged: the step's ``skipped_in_row`` machinery) and the scale is multiplied by
    ``backoff_factor`` (0.5); the growth counter restarts;
  * after ``growth_interval`` (2000) consecutive finite steps the scale is multiplied by
    ``growth_factor`` (2) -- unless that would overflow float32 -- and the counter restarts.

The scale and its counter (``LossScaleState``) are part of the ``TrainState`` and checkpointed, so a
resumed run continues with the same scale.  Only ``config.precision='float16'`` uses it; float32 and
bfloat16 (8 exponent bits, float32's range) train without a scale and their state has none.

Config: ``config.loss_scale.{init, growth_interval, growth_factor, backoff_factor}`` (checked, with the
defaults above, in ``adaface_jax.train.config``).
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
    init: float = 2.0 ** 16
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5

    @classmethod
    def from_config(cls, config) -> "LossScaleConfig":
        """``config.loss_scale`` of a training config, each field as its type here."""
        section = config.loss_scale
        return cls(**{f.name: type(getattr(cls, f.name))(section[f.name]) for f in dataclasses.fields(cls)})


@flax.struct.dataclass
class LossScaleState:
    """scale: the current loss scale (float32, 0-d); good_steps: consecutive finite steps since the
    last change (int32, 0-d; GradScaler's ``_growth_tracker``)."""

    scale: jax.Array
    good_steps: jax.Array

    @classmethod
    def create(cls, cfg: LossScaleConfig) -> "LossScaleState":
        return cls(scale=jnp.asarray(cfg.init, jnp.float32), good_steps=jnp.zeros((), jnp.int32))


def update(state: LossScaleState, finite: jax.Array, cfg: LossScaleConfig) -> LossScaleState:
    """GradScaler.update(): backoff on a non-finite step, growth after ``growth_interval`` finite ones."""
    good = state.good_steps + 1
    grow = good >= cfg.growth_interval
    grown = state.scale * jnp.float32(cfg.growth_factor)
    grown = jnp.where(jnp.isfinite(grown), grown, state.scale)
    scale_ok = jnp.where(grow, grown, state.scale)
    good_ok = jnp.where(grow, 0, good)
    return LossScaleState(scale=jnp.where(finite, scale_ok, state.scale * jnp.float32(cfg.backoff_factor)),
                          good_steps=jnp.where(finite, good_ok, 0).astype(jnp.int32))
