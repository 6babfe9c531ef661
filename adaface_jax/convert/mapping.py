"""THE mapping between AdaFace's PyTorch state_dict keys and our Flax variables (one place).

Module path: every PyTorch ``<name>.<index>`` pair becomes one Flax module ``<name>_<index>``
(``se_block`` included), other components are kept:

    model.input_layer.0.weight              params/input_layer_0/kernel            conv  (W.transpose(2,3,1,0))
    model.input_layer.1.{weight,bias}       params/input_layer_1/{scale,bias}      BN2d affine
    model.input_layer.1.running_{mean,var}  batch_stats/input_layer_1/{mean,var}
    model.input_layer.2.weight              params/input_layer_2/alpha             PReLU (per channel)
    model.body.K.res_layer.I.*              params|batch_stats/body_K/res_layer_I/*
    model.body.K.res_layer.se_block.fcJ.weight  params/body_K/res_layer_se_block/fcJ/kernel (conv)
    model.body.K.shortcut_layer.{0,1}.*     .../body_K/shortcut_layer_{0,1}/*
    model.output_layer.0.*                  .../output_layer_0/*                   BN2d
    model.output_layer.3.weight [512, C*S*S] params/output_layer_3/kernel [S*S*C, 512]
        kernel = W.reshape(512, C, S, S).transpose(2, 3, 1, 0).reshape(-1, 512)  (NCHW -> NHWC flatten)
    model.output_layer.3.bias               params/output_layer_3/bias
    model.output_layer.4.running_{mean,var} batch_stats/output_layer_4/{mean,var}  (BN1d, affine=False)
    *.num_batches_tracked                   dropped on import (a count, not a value), int64 on export
    head.kernel [512, C]                    head/kernel (as is)
    head.batch_mean, head.batch_std [1]     head/batch_mean, head/batch_std (AdaFaceState)
    head.t [1]                              dropped on import (never used), zeros(1) on export

Leaf names: conv/dense ``weight``->``kernel``, BN ``weight``->``scale``, PReLU ``weight``->``alpha``,
``bias``->``bias``, ``running_mean``->``mean``, ``running_var``->``var``.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import numpy as np

MODEL_PREFIX = "model."
HEAD_PREFIX = "head."
HEAD_STATE_KEYS = ("batch_mean", "batch_std")
HEAD_UNUSED_KEYS = ("t",)

_LEAF_TO_TORCH = {
    ("params", "scale"): "weight",
    ("params", "alpha"): "weight",
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}

_INDEXED = re.compile(r"^(.*)_(\d+|se_block)$")

# (units, bottleneck) -> num_layers, from the stage tables of adaface_jax.models.iresnet
_BASIC_UNITS = {8: 18, 16: 34, 24: 50, 49: 100}
_BOTTLENECK_UNITS = {50: 152, 66: 200}


def flax_module_to_torch(path: Iterable[str]) -> str:
    """('body_3', 'res_layer_se_block', 'fc1') -> 'body.3.res_layer.se_block.fc1'."""
    parts = []
    for name in path:
        m = _INDEXED.match(name)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else name)
    return ".".join(parts)


def flax_leaf_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
    """Torch key (without the ``model.`` prefix) of one Flax leaf ``collection/path``."""
    try:
        leaf = _LEAF_TO_TORCH[(collection, path[-1])]
    except KeyError:
        raise ValueError(f"no PyTorch counterpart for Flax variable {collection}/{'/'.join(path)}") from None
    return f"{flax_module_to_torch(path[:-1])}.{leaf}"


def leaf_kind(collection: str, path: tuple[str, ...], flax_shape: tuple[int, ...]) -> str:
    """How values move between the two layouts: 'conv', 'dense_nchw' or 'copy'."""
    if collection == "params" and path[-1] == "kernel":
        return "conv" if len(flax_shape) == 4 else "dense_nchw"
    return "copy"


def dense_geometry(params: Mapping) -> tuple[int, int]:
    """(C, S): channels and side of the feature map the output Linear flattens."""
    channels = int(np.shape(params["output_layer_0"]["scale"])[0])
    in_features = int(np.shape(params["output_layer_3"]["kernel"])[0])
    side = int(round((in_features / channels) ** 0.5))
    if side * side * channels != in_features:
        raise ValueError(f"output_layer_3 has {in_features} inputs, not C*S*S for C={channels}")
    return channels, side


def torch_to_flax_value(kind: str, w: np.ndarray, geometry: Optional[tuple[int, int]] = None) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    if kind == "dense_nchw":
        c, s = geometry
        out = w.shape[0]
        return np.ascontiguousarray(w.reshape(out, c, s, s).transpose(2, 3, 1, 0).reshape(-1, out))
    return w


def flax_to_torch_value(kind: str, v: np.ndarray, geometry: Optional[tuple[int, int]] = None) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(v.transpose(3, 2, 0, 1))
    if kind == "dense_nchw":
        c, s = geometry
        out = v.shape[1]
        return np.ascontiguousarray(v.reshape(s, s, c, out).transpose(3, 2, 0, 1).reshape(out, -1))
    return v


def torch_shape(kind: str, flax_shape: tuple[int, ...], geometry=None) -> tuple[int, ...]:
    if kind == "conv":
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if kind == "dense_nchw":
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def bn_modules(batch_stats: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Flax paths of every BatchNorm module (those holding batch_stats)."""
    out = []
    for name, sub in batch_stats.items():
        if "mean" in sub and not isinstance(sub["mean"], Mapping):
            out.append(prefix + (name,))
        else:
            out.extend(bn_modules(sub, prefix + (name,)))
    return out


def infer_arch(model_keys: Mapping[str, tuple[int, ...]]) -> tuple[str, int]:
    """(arch name, input size) from backbone keys (without prefix) and their shapes.

    Counts body units, tells bottleneck (res_layer.8) from basic blocks, looks for SE keys and reads
    the input size from the output Linear's in-features.
    """
    units = {int(k.split(".")[1]) for k in model_keys if k.startswith("body.")}
    if not units:
        raise ValueError("cannot infer the architecture: no 'body.*' keys in the checkpoint")
    n_units = max(units) + 1
    bottleneck = any(k.startswith("body.0.res_layer.8.") for k in model_keys)
    se = any(".se_block." in k for k in model_keys)
    table = _BOTTLENECK_UNITS if bottleneck else _BASIC_UNITS
    if n_units not in table:
        kind = "bottleneck" if bottleneck else "basic"
        raise ValueError(f"cannot infer the architecture: {n_units} {kind} body units match no IResNet "
                         f"(known: {sorted(table)})")
    layers = table[n_units]
    depth = 101 if layers == 100 else layers
    arch = f"ir_se_{depth}" if se else f"ir_{depth}"
    lin = model_keys.get("output_layer.3.weight")
    if lin is None or len(lin) != 2:
        raise ValueError("cannot infer the input size: 'output_layer.3.weight' missing or not 2-D")
    channels = 2048 if bottleneck else 512
    side = int(round((lin[1] / channels) ** 0.5))
    if side * side * channels != lin[1]:
        raise ValueError(f"cannot infer the input size: output_layer.3.weight has {lin[1]} in-features, "
                         f"not {channels}*S*S")
    return arch, side * 16
