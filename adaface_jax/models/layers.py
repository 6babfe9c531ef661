"""Small layers the IResNet needs and Flax does not provide with PyTorch semantics."""
from __future__ import annotations

import functools
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

    * ``closed_form_backward`` differentiates a batch-statistics pass with the closed-form gradient
      (``batch_norm_closed_form``) instead of autodiff through the mean and variance; the same values up to
      float rounding, fewer passes over the activations. Inside ``shard_map``/``pmap`` (``axis_name``)
      autodiff is always used.

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
    closed_form_backward: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = (self.param("scale", nn.initializers.ones, (features,), self.param_dtype).astype(jnp.float32)
                 if self.use_scale else None)
        bias = (self.param("bias", nn.initializers.zeros, (features,), self.param_dtype).astype(jnp.float32)
                if self.use_bias else None)
        out_dtype = self.dtype or x.dtype
        if use_running_average:
            y = (x.astype(jnp.float32) - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
            return _affine(y, scale, bias).astype(out_dtype)
        if x.shape[0] % self.num_groups:
            raise ValueError(f"BatchNorm: batch of {x.shape[0]} does not split into {self.num_groups} groups")
        if self.closed_form_backward and self.axis_name is None:
            ones = jnp.ones((features,), jnp.float32)
            y, mean, var = batch_norm_closed_form(x, ones if scale is None else scale,
                                                  jnp.zeros_like(ones) if bias is None else bias,
                                                  self.num_groups, self.epsilon, out_dtype)
        else:
            y, mean, var = _batch_norm_autodiff(x, scale, bias, self.num_groups, self.epsilon, self.axis_name,
                                                out_dtype)
        if not self.is_initializing():
            # Running statistics follow group 0; they are not differentiated.
            count = x.size // (features * self.num_groups)  # values per channel in one group's statistics
            if self.axis_name is not None:
                count *= jax.lax.psum(1, self.axis_name)
            mean0, var0 = jax.lax.stop_gradient(mean[0]), jax.lax.stop_gradient(var[0])
            unbiased = var0 * (count / jnp.maximum(count - 1, 1))
            ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean0
            ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
        return y


def _grouped(x32, num_groups):
    """(G, N/G, ..., C) view of a batch and the axes one group's statistics reduce over."""
    xg = x32.reshape((num_groups, x32.shape[0] // num_groups) + x32.shape[1:])
    return xg, tuple(range(1, xg.ndim - 1))


def _batch_moments(xg, axes, axis_name=None):
    """Per-group mean and biased variance; averaged over ``axis_name`` inside ``shard_map``/``pmap``."""
    reduce = (lambda v: v) if axis_name is None else (lambda v: jax.lax.pmean(v, axis_name))
    mean = reduce(jnp.mean(xg, axis=axes, keepdims=True))
    # Two-pass variance (as PyTorch) rather than E[x^2]-E[x]^2, which loses precision.
    var = reduce(jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True))
    return mean, var


def _affine(y, scale, bias):
    y = y * scale if scale is not None else y
    return y + bias if bias is not None else y


def _batch_norm_autodiff(x, scale, bias, num_groups, eps, axis_name, out_dtype):
    """Train-mode BatchNorm differentiated by autodiff -> (y, mean (G, C), biased var (G, C))."""
    xg, axes = _grouped(x.astype(jnp.float32), num_groups)
    mean, var = _batch_moments(xg, axes, axis_name)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    c = x.shape[-1]
    return _affine(y, scale, bias).astype(out_dtype), mean.reshape(num_groups, c), var.reshape(num_groups, c)


def _bn_forward(x, scale, bias, num_groups, eps, out_dtype):
    outputs = _batch_norm_autodiff(x, scale, bias, num_groups, eps, None, out_dtype)  # the same forward
    _, mean, var = outputs
    return outputs, (x, mean, jax.lax.rsqrt(var + eps), scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_closed_form(x, scale, bias, num_groups, eps, out_dtype):
    """Train-mode BatchNorm with per-group batch statistics -> (y, mean (G, C), biased var (G, C)).

    Its gradient is the closed form (as PyTorch's ``batch_norm_backward``), per group of M values per channel:

        dx = scale * rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
        dscale = sum(dy * x_hat),  dbias = sum(dy),

    with ``x_hat`` recomputed from the saved input: two passes over ``x`` and ``dy`` where autodiff through
    the mean and the two-pass variance takes several. ``mean`` and ``var`` are for the running statistics:
    no gradient flows back through them (their cotangents are ignored; callers stop the gradient).
    """
    return _bn_forward(x, scale, bias, num_groups, eps, out_dtype)[0]


def _bn_bwd(num_groups, eps, out_dtype, residuals, cotangents):
    x, mean, rstd, scale = residuals  # mean, rstd: (G, C)
    dy = cotangents[0]
    xg, axes = _grouped(x.astype(jnp.float32), num_groups)
    dyg = dy.astype(jnp.float32).reshape(xg.shape)
    per_group = (num_groups,) + (1,) * (xg.ndim - 2) + (x.shape[-1],)
    rstd = rstd.reshape(per_group)
    x_hat = (xg - mean.reshape(per_group)) * rstd
    sum_dy = jnp.sum(dyg, axis=axes, keepdims=True)
    sum_dy_xhat = jnp.sum(dyg * x_hat, axis=axes, keepdims=True)
    m = xg[0].size // xg.shape[-1]
    dx = (scale * rstd) * (dyg - sum_dy / m - x_hat * (sum_dy_xhat / m))
    c = x.shape[-1]
    return (dx.reshape(x.shape).astype(x.dtype), sum_dy_xhat.reshape(num_groups, c).sum(0),
            sum_dy.reshape(num_groups, c).sum(0))


batch_norm_closed_form.defvjp(_bn_forward, _bn_bwd)


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
