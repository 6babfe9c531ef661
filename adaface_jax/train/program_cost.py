"""What a training step costs: model FLOPs (from its jaxpr) and collective bytes (from its compiled HLO).

Kept apart from the dry run (which needs the input pipeline's manifest reader, and so TensorFlow) so that
accelerator benchmarks can import it on hosts without TensorFlow.
"""
from __future__ import annotations

import re

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(pred|[subfc]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")


def model_flops(fn, *args) -> float:
    """Model FLOPs of one call ``fn(*args)``, over its whole global batch: twice the multiply-adds of every
    convolution and matrix product in its jaxpr (the forward and, for a train step, both gradients).

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s; nothing is compiled or run. Counted on the jaxpr,
    not on XLA's compiled program: that count is per device, includes elementwise work, and on XLA:GPU
    leaves out the convolutions and matrix products handed to cuDNN/cuBLAS (an ir_50 train step on an H200
    counted 0.46 GFLOP per image; the lowered module's analysis gave 0). This is the numerator of MFU as
    the PaLM paper (Chowdhery et al. 2022, appendix B) defines it: the model's FLOPs, not the hardware's.
    Taps on padding, and on the zeros a strided convolution's input gradient is dilated with, are not
    counted (as in XLA's HLO cost analysis). A ``scan`` body counts once per iteration; ``while`` loops
    (trip count unknown) once; ``cond`` its costliest branch."""
    import jax  # noqa: PLC0415

    # A jitted function is traced as the top-level jit it is (make_jaxpr would nest it, and a nested jit may
    # not carry compiler options).
    closed = fn.trace(*args).jaxpr if hasattr(fn, "trace") else jax.make_jaxpr(fn)(*args)
    return float(_jaxpr_flops(closed.jaxpr))


def _taps(out_size: int, in_size: int, kernel: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output position, kernel tap) pairs along one spatial dimension that land on a real input element,
    not on padding or on a hole of the input's dilation (a strided convolution's input gradient)."""
    extent = (in_size - 1) * lhs_dil + 1
    n = 0
    for o in range(out_size):
        for k in range(kernel):
            pos = o * stride - pad_lo + k * rhs_dil
            n += 0 <= pos < extent and pos % lhs_dil == 0
    return n


def _conv_flops(eqn) -> int:
    """2 x multiply-adds of a ``conv_general_dilated`` that touch real input, as XLA's HLO cost analysis
    counts them (padding and dilation holes excluded)."""
    p = eqn.params
    lhs, rhs, out = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    taps = 1
    for i in range(len(rhs_spec) - 2):
        taps *= _taps(out[out_spec[2 + i]], lhs[lhs_spec[2 + i]], rhs[rhs_spec[2 + i]], p["window_strides"][i],
                      p["padding"][i][0], p["lhs_dilation"][i], p["rhs_dilation"][i])
    # Every output batch/feature element sums over the kernel's input features at each valid tap.
    return 2 * out[out_spec[0]] * out[out_spec[1]] * rhs[rhs_spec[1]] * taps


def _jaxpr_flops(jaxpr) -> int:
    import jax.extend.core as jcore  # noqa: PLC0415

    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = int(np.prod([lhs[d] for d in lhs_contract], dtype=np.int64))
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape, dtype=np.int64)) * contracted
        subs = [v for v in eqn.params.values() if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr))]
        subs += [b for v in eqn.params.values() if isinstance(v, tuple) for b in v
                 if isinstance(b, (jcore.Jaxpr, jcore.ClosedJaxpr))]
        counts = [_jaxpr_flops(getattr(j, "jaxpr", j)) for j in subs]
        if name == "cond":
            total += max(counts, default=0)   # one branch runs
        elif name == "scan":
            total += eqn.params["length"] * sum(counts)
        else:
            total += sum(counts)
    return total


def shape_bytes(text: str) -> list[int]:
    """Byte sizes of every ``dtype[dims]`` in an HLO shape string, in order."""
    out = []
    for dtype, dims in _SHAPE.findall(text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        out.append(n * _DTYPE_BYTES.get(dtype, 4))
    return out


def collective_bytes(hlo_text: str) -> dict[str, dict]:
    """{kind: {'count': ops, 'bytes': result bytes}} of the collectives in a compiled HLO module's text."""
    stats = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        result, kind, suffix = m.groups()
        if suffix == "-done":
            continue
        sizes = shape_bytes(result)
        if not sizes:
            continue
        stats[kind]["count"] += 1
        stats[kind]["bytes"] += sizes[-1] if suffix == "-start" else sum(sizes)
    return stats


def gathered_shapes(hlo_text: str) -> list[str]:
    """Result shapes of every all-gather in the HLO (to check that the classifier is never gathered)."""
    return [m.group(1) for line in hlo_text.splitlines() if (m := _OP.search(line)) and m.group(2) == "all-gather"]
