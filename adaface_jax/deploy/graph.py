"""The IResNet written out as a sequence of plain operations, for exporters.

``walk_iresnet(emitter, x, variables, arch, width)`` follows ``adaface_jax.models.iresnet`` layer by
layer (the original net.py: input layer, body units, output layer) and calls the emitter with numpy
weights in Flax layout (conv kernels HWIO, the output Linear's rows in NHWC-flatten order). An emitter
maps each call to its own graph (ONNX nodes, TensorFlow ops), so the architecture is written once.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from adaface_jax.models import ARCHS
from adaface_jax.models.iresnet import unit_strides

BN_EPSILON = 1e-5  # nn.BatchNorm2d / BatchNorm1d default, as adaface_jax.models.layers.BatchNorm


class Emitter(Protocol):
    def conv(self, x: Any, kernel_hwio: np.ndarray, stride: int, pad: int) -> Any: ...
    def batch_norm(self, x: Any, mean, var, scale, bias, eps: float) -> Any: ...
    def prelu(self, x: Any, alpha: np.ndarray) -> Any: ...
    def relu(self, x: Any) -> Any: ...
    def sigmoid(self, x: Any) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def spatial_mean(self, x: Any) -> Any: ...
    def subsample(self, x: Any, stride: int) -> Any: ...
    def dense_from_nhwc_flatten(self, x: Any, kernel: np.ndarray, bias: np.ndarray) -> Any: ...
    def to_output_precision(self, x: Any) -> Any: ...
    def l2_normalize(self, x: Any) -> tuple[Any, Any]: ...


def arch_spec(arch: str) -> tuple[int, bool]:
    """(num_layers, use_se) of an architecture name."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    spec = ARCHS[arch]
    return int(spec["num_layers"]), bool(spec["use_se"])


def _np(tree) -> Any:
    if isinstance(tree, dict):
        return {k: _np(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def walk_iresnet(em: Emitter, x, variables: dict, arch: str, width: int = 64):
    """Emit the eval-mode IResNet on input ``x`` (already NHWC-equivalent, normalised BGR for the
    first conv). Returns ``(embedding, norm)`` handles of the emitter."""
    num_layers, use_se = arch_spec(arch)
    params, stats = _np(variables["params"]), _np(variables["batch_stats"])

    def bn(x, p, s, affine=True):
        return em.batch_norm(x, s["mean"], s["var"], p["scale"] if affine else None, p["bias"] if affine else None,
                             BN_EPSILON)

    x = em.conv(x, params["input_layer_0"]["kernel"], 1, 1)
    x = bn(x, params["input_layer_1"], stats["input_layer_1"])
    x = em.prelu(x, params["input_layer_2"]["alpha"])
    bottleneck = num_layers > 100
    for k, (cin, depth, stride) in enumerate(unit_strides(num_layers, width)):
        p, s = params[f"body_{k}"], stats[f"body_{k}"]
        r = bn(x, p["res_layer_0"], s["res_layer_0"])
        if bottleneck:
            r = em.conv(r, p["res_layer_1"]["kernel"], 1, 0)
            r = em.prelu(bn(r, p["res_layer_2"], s["res_layer_2"]), p["res_layer_3"]["alpha"])
            r = em.conv(r, p["res_layer_4"]["kernel"], 1, 1)
            r = em.prelu(bn(r, p["res_layer_5"], s["res_layer_5"]), p["res_layer_6"]["alpha"])
            r = em.conv(r, p["res_layer_7"]["kernel"], stride, 0)
            r = bn(r, p["res_layer_8"], s["res_layer_8"])
        else:
            r = em.conv(r, p["res_layer_1"]["kernel"], 1, 1)
            r = em.prelu(bn(r, p["res_layer_2"], s["res_layer_2"]), p["res_layer_3"]["alpha"])
            r = em.conv(r, p["res_layer_4"]["kernel"], stride, 1)
            r = bn(r, p["res_layer_5"], s["res_layer_5"])
        if use_se:
            se = p["res_layer_se_block"]
            g = em.relu(em.conv(em.spatial_mean(r), se["fc1"]["kernel"], 1, 0))
            r = em.mul(r, em.sigmoid(em.conv(g, se["fc2"]["kernel"], 1, 0)))
        if cin == depth:
            shortcut = em.subsample(x, stride)  # MaxPool2d(1, stride)
        else:
            shortcut = em.conv(x, p["shortcut_layer_0"]["kernel"], stride, 0)
            shortcut = bn(shortcut, p["shortcut_layer_1"], s["shortcut_layer_1"])
        x = em.add(r, shortcut)
    x = bn(x, params["output_layer_0"], stats["output_layer_0"])
    x = em.dense_from_nhwc_flatten(x, params["output_layer_3"]["kernel"], params["output_layer_3"]["bias"])
    x = em.to_output_precision(x)  # the last BatchNorm1d and the norm run in float32, as in the model
    x = em.batch_norm(x, stats["output_layer_4"]["mean"], stats["output_layer_4"]["var"], None, None, BN_EPSILON)
    return em.l2_normalize(x)
