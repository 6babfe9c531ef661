"""A drop-in ``conv_general_dilated`` for ``nn.Conv`` whose input gradient of a strided convolution is split
into stride phases: the faster way to train on XLA:CPU.

Autodiff writes the input gradient of a stride-s convolution as a convolution over the output gradient
dilated with s-1 zeros between its pixels (an ``lhs_dilation``). XLA:CPU's Eigen kernels have no dilated
input, so XLA runs it with its generic loop, over s*s times the positions, three quarters of them zeros
at stride 2 (7 of the 52 convolutions of ir_50).

Split by phase instead. With ``x_pad`` the padded input, y[o] = sum_k x_pad[s*o + k] w[k] on each spatial
axis, so the gradient at padded position p = s*q + r (0 <= r < s) is

    dx_pad[s*q + r] = sum_t dy[q - t] w[r + s*t],

an ordinary stride-1 correlation of ``dy`` with the sub-kernel ``w[r::s]`` flipped, for each of the s*s
phases (r_h, r_w); the phases are then interleaved and the padding cropped. The multiply-adds are exactly
the non-zero ones, and each phase is a plain convolution Eigen runs.

The forward and the weight gradient are XLA's own, the parameters and outputs identical. Only plain
NHWC/HWIO 2-D convolutions (no dilation, no groups) with a stride above 1 take this path; every other one
is ``lax.conv_general_dilated`` unchanged. It is a CPU choice (``adaface_jax.compile_options``):
accelerators keep XLA's gradient, which cuDNN and the TPU compiler run well.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_VALID = ((0, 0), (0, 0))


def _conv(x, w, strides, pads, precision):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC_HWIO, precision=precision)


def input_grad_by_phase(dy, w, in_hw, strides, pads, precision=None):
    """dx (N, H, W, Ci) of the NHWC/HWIO convolution with kernel ``w``, ``strides`` and explicit ``pads`` whose
    input was ``in_hw`` and whose output gradient is ``dy``, computed one stride phase at a time."""
    (sh, sw), (kh, kw) = strides, w.shape[:2]
    n, ho, wo, _ = dy.shape
    ci = w.shape[2]
    # Padded input length, and the phase length covering it: Q >= Ho whenever the kernel has a tap.
    qh = -(-(in_hw[0] + pads[0][0] + pads[0][1]) // sh)
    qw = -(-(in_hw[1] + pads[1][0] + pads[1][1]) // sw)
    rows = []
    for rh in range(sh):
        cols = []
        for rw in range(sw):
            sub = w[rh::sh, rw::sw]
            th, tw = sub.shape[:2]
            if th == 0 or tw == 0:  # a phase no tap reaches (kernel smaller than the stride)
                cols.append(jnp.zeros((n, qh, qw, ci), dy.dtype))
                continue
            dy_pad = lax.pad(dy, jnp.zeros((), dy.dtype),
                             ((0, 0, 0), (th - 1, qh - ho, 0), (tw - 1, qw - wo, 0), (0, 0, 0)))
            # Correlating with the flipped sub-kernel, in/out channels swapped, sums dy[q - t] w[r + s*t].
            cols.append(_conv(dy_pad, jnp.swapaxes(sub[::-1, ::-1], 2, 3), (1, 1), _VALID, precision))
        rows.append(jnp.stack(cols, axis=3))            # (N, Qh, Qw, sw, Ci)
    dx_pad = jnp.stack(rows, axis=2).reshape(n, sh * qh, sw * qw, ci)  # (N, Qh, sh, Qw, sw, Ci) interleaved
    return dx_pad[:, pads[0][0]:pads[0][0] + in_hw[0], pads[1][0]:pads[1][0] + in_hw[1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_phase_grad(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision)


def _fwd(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision), (x, w)


def _bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    dx = input_grad_by_phase(dy, w, x.shape[1:3], strides, pads, precision).astype(x.dtype)
    dw = jax.vjp(lambda k: _conv(x, k, strides, pads, precision), w)[1](dy)[0]
    return dx, dw


_conv_phase_grad.defvjp(_fwd, _bwd)


def _explicit_pads(padding, in_hw, kernel_hw, strides):
    if isinstance(padding, str):
        return tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated_phase_grad(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                    dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                                    precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` whose strided input gradient is split by phase (module docstring); every
    convolution this does not apply to is passed to ``lax.conv_general_dilated`` unchanged."""
    strides = tuple(int(s) for s in window_strides)
    plain = (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
             and preferred_element_type is None and max(strides) > 1
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == NHWC_HWIO)
    if plain:
        pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], strides)
        if min(min(p) for p in pads) >= 0:  # a negative pad crops the input: left to XLA
            return _conv_phase_grad(lhs, rhs, strides, pads, precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision, preferred_element_type)
