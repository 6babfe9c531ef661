"""A drop-in ``conv_general_dilated`` for ``nn.Conv`` whose weight gradient is a matrix product over
im2col columns: the faster way to train on XLA:CPU.

XLA expresses the weight gradient of a convolution as another convolution, whose "kernel" is the
output gradient: an HxW window over the whole image. XLA:CPU runs that several times slower than the
forward convolution at the early, high-resolution layers of an IResNet, where oneDNN's backward-weights
kernel, which PyTorch uses, costs about what the forward does. Written as a GEMM,

    dW[i, j, ci, co] = sum_{n, h, w} x_pad[n, h*s + i, w*s + j, ci] * dy[n, h, w, co]
                     = (columns^T @ dy)  with  columns[(n, h, w), (i, j, ci)],

it is an ordinary matrix product, which XLA:CPU runs well. The columns are built a band of output rows at
a time (about ``COLUMN_BYTES`` each), so the temporary is tens of MB rather than a kh*kw-fold copy of the
activation, and is faster too; bands split the rows, never the batch, so a batch sharded over devices stays
where it is.

The forward and the input gradient are XLA's own. Only plain NHWC/HWIO 2-D convolutions with large
outputs (``MIN_OUTPUT_POSITIONS``) or 1x1 kernels take the GEMM path; at late 14x14 and 7x7 layers XLA's
own gradient is as fast or faster. Accelerators keep XLA's gradient (cuDNN / the TPU compiler do this
well): ``config.model.conv_weight_grad = 'auto'`` chooses by backend. The whole step, both ways against the
original-style PyTorch step: ``benchmarks/bench_train_step.py``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Output positions (Ho * Wo) from which the GEMM gradient wins on XLA:CPU (28x28 and up, measured).
MIN_OUTPUT_POSITIONS = 28 * 28
# Bytes of im2col columns per band (float32), and at most this many bands (each is a separate product in
# the compiled program, so more bands mean a longer compile).
COLUMN_BYTES = 32 * 2 ** 20
MAX_BANDS = 32
NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))

WEIGHT_GRAD_CHOICES = ("auto", "xla", "gemm")


def resolve_weight_grad(choice: str, backend: str | None = None) -> str:
    """'auto' -> 'gemm' on the CPU backend, 'xla' elsewhere; 'xla' and 'gemm' are kept."""
    if choice not in WEIGHT_GRAD_CHOICES:
        raise ValueError(f"conv_weight_grad must be one of {WEIGHT_GRAD_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    return "gemm" if (backend or jax.default_backend()) == "cpu" else "xla"


def conv_op(weight_grad: str):
    """The ``conv_general_dilated`` for ``nn.Conv``: None (Flax's default, XLA's) for ``'xla'``, or
    ``conv_general_dilated_gemm_grad`` for ``'gemm'``. Parameters and outputs are identical."""
    if weight_grad not in ("xla", "gemm"):
        raise ValueError(f"conv_weight_grad must be 'xla' or 'gemm' (resolve 'auto' first), got {weight_grad!r}")
    return conv_general_dilated_gemm_grad if weight_grad == "gemm" else None


def _conv(x, w, strides, pads, precision):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC_HWIO, precision=precision)


def weight_grad_gemm(x, dy, kernel_hw, strides, pads, precision=None, column_bytes: int = COLUMN_BYTES):
    """dW (kh, kw, Ci, Co) of the NHWC/HWIO convolution of ``x`` with output gradient ``dy``, as a sum of
    band-wise ``dy_band^T @ columns_band`` products accumulated in float32."""
    kh, kw = kernel_hw
    sh, sw = strides
    n, _, _, ci = x.shape
    _, ho, wo, co = dy.shape
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (pads[0][0], pads[0][1], 0), (pads[1][0], pads[1][1], 0), (0, 0, 0)))
    row_bytes = n * wo * kh * kw * ci * 4
    bands = max(1, min(ho, MAX_BANDS, math.ceil(ho * row_bytes / column_bytes)))
    edges = [ho * b // bands for b in range(bands + 1)]
    total = None
    for r0, r1 in zip(edges[:-1], edges[1:]):
        rows = r1 - r0
        cols = [lax.slice(xp, (0, r0 * sh + i, j, 0), (n, r0 * sh + i + (rows - 1) * sh + 1, j + (wo - 1) * sw + 1, ci),
                          (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
        cols = (cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)).reshape(n * rows * wo, kh * kw * ci)
        part = lax.dot_general(dy[:, r0:r1].reshape(n * rows * wo, co), cols, (((0,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)   # (Co, kh*kw*Ci)
        total = part if total is None else total + part
    return total.T.reshape(kh, kw, ci, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_gemm_grad(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision)


def _fwd(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision), (x, w)


def _bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    dx = jax.vjp(lambda a: _conv(a, w, strides, pads, precision), x)[1](dy)[0]
    dw = weight_grad_gemm(x, dy, w.shape[:2], strides, pads, precision)
    return dx, dw.astype(w.dtype)


_conv_gemm_grad.defvjp(_fwd, _bwd)


def _explicit_pads(padding, in_hw, kernel_hw, strides):
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated_gemm_grad(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                   dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                                   precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` with the GEMM weight gradient where it is faster (see the module
    docstring); every other convolution is passed to ``lax.conv_general_dilated`` unchanged."""
    plain = (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
             and preferred_element_type is None
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == NHWC_HWIO)
    if plain:
        strides = tuple(int(s) for s in window_strides)
        pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], strides)
        out_hw = [(lhs.shape[1 + a] + pads[a][0] + pads[a][1] - rhs.shape[a]) // strides[a] + 1 for a in (0, 1)]
        if out_hw[0] * out_hw[1] >= MIN_OUTPUT_POSITIONS or rhs.shape[0] * rhs.shape[1] == 1:
            return _conv_gemm_grad(lhs, rhs, strides, pads, precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision, preferred_element_type)
