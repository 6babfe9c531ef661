"""A few-layer backbone with the IResNet's contract, for smoke runs and tests (``build_model("tiny")``).

Same parameter kinds as the IResNet (bias-free conv, BatchNorm scale/bias, per-channel PReLU, Linear
weight and bias, affine-free BatchNorm1d) so the optimizer groups, sharding and checkpointing are
exercised the same way; any input size works.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from adaface_jax.models.layers import BatchNorm, PReLU


class TinyBackbone(nn.Module):
    embedding_size: int = 16
    width: int = 8
    use_bn: bool = True
    bn_groups: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        x = nn.Conv(self.width, (3, 3), strides=(2, 2), use_bias=False, dtype=self.dtype, name="conv")(x)
        if self.use_bn:
            x = BatchNorm(use_running_average=not train, num_groups=self.bn_groups, dtype=self.dtype, name="bn")(x)
        x = PReLU(name="prelu")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.embedding_size, dtype=self.dtype, name="fc")(x)
        if self.use_bn:
            x = BatchNorm(use_running_average=not train, use_scale=False, use_bias=False, num_groups=self.bn_groups,
                          dtype=jnp.float32, name="bn1d")(x)
        x = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
        return x / norm, norm
