"""The IResNet as a TensorFlow SavedModel with a ``serving_default`` signature (TF Serving, TFLite).

Built from plain TensorFlow ops (conv2d, elementwise, matmul) over ``tf.Variable`` weights, so the
graph holds no XLA-only call and converts to TFLite. Input ``input``: float32 NHWC (or NCHW),
normalised BGR (or RGB); outputs ``embedding`` and ``norm`` (unless ``include_norm=False``). The
input contract is written to ``assets.extra/adaface_meta.json`` inside the SavedModel folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from adaface_jax import io
from adaface_jax.deploy.graph import walk_iresnet
from adaface_jax.deploy.onnx_export import input_contract, with_input_contract
from adaface_jax.errors import InputError

META_FILE = "assets.extra/adaface_meta.json"


class _TFEmitter:
    """NHWC TensorFlow ops; every weight becomes a tracked ``tf.Variable``, created on the first pass
    and handed out again, in the same order, on later passes (``start`` rewinds)."""

    def __init__(self, tf):
        self.tf = tf
        self.weights: list = []
        self._next = 0

    def start(self):
        self._next = 0

    def var(self, value):
        if self._next == len(self.weights):
            self.weights.append(self.tf.Variable(np.asarray(value, np.float32), trainable=False))
        v = self.weights[self._next]
        self._next += 1
        return v

    def conv(self, x, kernel_hwio, stride, pad):
        return self.tf.nn.conv2d(x, self.var(kernel_hwio), strides=[1, stride, stride, 1],
                                 padding=[[0, 0], [pad, pad], [pad, pad], [0, 0]])

    def batch_norm(self, x, mean, var, scale, bias, eps):
        tf = self.tf
        y = (x - self.var(mean)) * tf.math.rsqrt(self.var(var) + eps)
        if scale is not None:
            y = y * self.var(scale)
        if bias is not None:
            y = y + self.var(bias)
        return y

    def prelu(self, x, alpha):
        return self.tf.where(x >= 0, x, self.var(alpha) * x)

    def relu(self, x):
        return self.tf.nn.relu(x)

    def sigmoid(self, x):
        return self.tf.math.sigmoid(x)

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def spatial_mean(self, x):
        return self.tf.reduce_mean(x, axis=[1, 2], keepdims=True)

    def subsample(self, x, stride):
        return x if stride == 1 else x[:, ::stride, ::stride, :]

    def dense_from_nhwc_flatten(self, x, kernel, bias):
        flat = self.tf.reshape(x, [-1, int(np.shape(kernel)[0])])
        return self.tf.matmul(flat, self.var(kernel)) + self.var(bias)

    def to_output_precision(self, x):
        return x

    def l2_normalize(self, x):
        norm = self.tf.sqrt(self.tf.reduce_sum(x * x, axis=1, keepdims=True))
        return x / norm, norm


def build_tf_module(variables: dict, arch: str, *, width: int = 64, input_size: int = 112, layout: str = "NHWC",
                    channel_order: str = "BGR", include_norm: bool = True):
    """-> a ``tf.Module`` whose ``serve(input)`` returns ``{'embedding', 'norm'}``."""
    if layout not in ("NHWC", "NCHW"):
        raise InputError(f"--layout {layout}: expected NHWC or NCHW")
    variables = with_input_contract(variables, channel_order)
    shape = [None, 3, input_size, input_size] if layout == "NCHW" else [None, input_size, input_size, 3]

    module = tf.Module()
    emitter = _TFEmitter(tf)

    def forward(x):
        emitter.start()
        if layout == "NCHW":
            x = tf.transpose(x, [0, 2, 3, 1])
        emb, norm = walk_iresnet(emitter, x, variables, arch, width)
        return {"embedding": emb, "norm": norm} if include_norm else {"embedding": emb}

    forward(tf.zeros([1] + shape[1:], tf.float32))  # an eager pass creates every variable
    module.weights_list = emitter.weights           # tracked, so saved under variables/
    module.serve = tf.function(forward, input_signature=[tf.TensorSpec(shape, tf.float32, name="input")])
    return module


def save_savedmodel(variables: dict, arch: str, out_dir: str, *, width: int = 64, input_size: int = 112,
                    layout: str = "NHWC", channel_order: str = "BGR", include_norm: bool = True,
                    metadata: dict | None = None) -> dict:
    """Write the SavedModel folder (local or ``gs://``): built in a local temporary folder, then copied in
    with ``saved_model.pb`` last, so the folder is a SavedModel only once it is whole; returns the contract."""
    module = build_tf_module(variables, arch, width=width, input_size=input_size, layout=layout,
                             channel_order=channel_order, include_norm=include_norm)
    tmp = tempfile.mkdtemp(prefix="adaface-savedmodel-")  # built locally, then copied in (local or gs://)
    try:
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
        contract = input_contract(arch, input_size, layout, channel_order, "float32", include_norm, metadata)
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        io.write_text(os.path.join(tmp, *META_FILE.split("/")), json.dumps(contract, indent=2))
        io.publish_dir(tmp, out_dir, last=(META_FILE, "saved_model.pb"))  # loaders look for saved_model.pb
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return contract
