"""Small layers the IResNet needs and Flax does not provide with PyTorch semantics."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn


def conv_kernel_init_torch_fan_out():
    """kaiming_normal(mode='fan_out', nonlinearity='relu'): std = sqrt(2 / (out*kh*kw))."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class PReLU(nn.Module):
    """Per-channel PReLU (PyTorch ``nn.PReLU(C)``); Flax's built-in one has a scalar slope."""

    init_value: float = 0.25
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.constant(self.init_value), (x.shape[-1],), self.param_dtype)
        alpha = alpha.astype(x.dtype)
        return jnp.where(x >= 0, x, alpha * x)


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch semantics and explicit control over whose statistics are used.

    * Normalisation uses the biased batch variance; the running variance is updated with the
      unbiased one, like ``torch.nn.BatchNorm*d`` (Flax's BatchNorm uses the biased one).
    * Statistics are taken over the whole (global) batch by default.  Under ``jit`` with the batch
      sharded over a mesh this is a synchronised BatchNorm across all devices.
    * ``num_groups > 1`` splits the batch into that many equal, contiguous groups and normalises
      each with its own statistics -- what per-GPU (unsynchronised) DDP BatchNorm computes when
      group g is device g's shard.  Running statistics then follow group 0, as DDP's
      ``broadcast_buffers`` makes rank 0's buffers the ones that survive.
    * ``axis_name`` averages the statistics over a named axis (inside ``shard_map``/``pmap``).

    Variables are named like Flax's BatchNorm: params ``scale``/``bias``, batch_stats ``mean``/``var``.
    """

    use_running_average: Optional[bool] = None
    momentum: float = 0.9  # Flax convention: torch momentum 0.1
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    num_groups: int = 1
    axis_name: Optional[str] = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        x32 = x.astype(jnp.float32)
        if use_running_average:
            mean = ra_mean.value
            var = ra_var.value
            y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        else:
            groups = self.num_groups
            if x.shape[0] % groups:
                raise ValueError(f"BatchNorm: batch of {x.shape[0]} does not split into {groups} groups")
            xg = x32.reshape((groups, x.shape[0] // groups) + x.shape[1:])
            reduce_axes = tuple(range(1, xg.ndim - 1))
            count = 1
            for a in reduce_axes:
                count *= xg.shape[a]
            mean = jnp.mean(xg, axis=reduce_axes, keepdims=True)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            # Two-pass variance (as PyTorch) rather than E[x^2]-E[x]^2, which loses precision.
            var = jnp.mean(jnp.square(xg - mean), axis=reduce_axes, keepdims=True)
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
                count *= jax.lax.psum(1, self.axis_name)
            y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            if not self.is_initializing():
                mean0 = mean.reshape((groups, features))[0]
                var0 = var.reshape((groups, features))[0]
                unbiased = var0 * (count / jnp.maximum(count - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean0
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (features,), self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (features,), self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


class SEModule(nn.Module):
    """Squeeze-and-excitation with 1x1 convs without bias (``fc1``, ``fc2``) as in IR-SE."""

    channels: int
    reduction: int = 16
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.Conv(self.channels // self.reduction, (1, 1), use_bias=False, name="fc1",
                    kernel_init=conv_kernel_init_torch_fan_out(), dtype=self.dtype, param_dtype=self.param_dtype)(s)
        s = nn.relu(s)
        s = nn.Conv(self.channels, (1, 1), use_bias=False, name="fc2",
                    kernel_init=conv_kernel_init_torch_fan_out(), dtype=self.dtype, param_dtype=self.param_dtype)(s)
        return x * nn.sigmoid(s)
