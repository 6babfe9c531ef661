"""The IResNet as an ONNX model (opset 17), for onnxruntime and TensorRT.

Written node by node from the converted weights with ``onnx.helper`` (no tracing): only Conv,
BatchNormalization, PRelu, Relu, Sigmoid, Add, Mul, MaxPool, ReduceMean, Flatten, Gemm, ReduceSum,
Sqrt, Div, Transpose and Cast, all in onnxruntime's and TensorRT's supported set at opset 17.
The batch dimension is dynamic (``batch``).

``dtype="float16"``: weights and the backbone compute in float16 (what a TensorRT FP16 engine runs);
the input and outputs stay float32 and the last BatchNorm1d and the norm are float32, like the
model's own mixed-precision path.
"""
from __future__ import annotations

import json

import numpy as np

from adaface_jax.convert.mapping import flax_to_torch_value
from adaface_jax.deploy.graph import walk_iresnet
from adaface_jax.errors import InputError
from adaface_jax.io import atomic_write

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAMES = ("embedding", "norm")


def require_onnx():
    try:
        import onnx  # noqa: PLC0415  (the optional [export] extra)
    except ImportError:
        raise InputError("--format onnx needs the optional export extra: pip install 'adaface-jax[export]' "
                         "(onnx and onnxruntime)") from None
    return onnx, onnx.helper, onnx.numpy_helper


class _OnnxEmitter:
    """Builds NCHW ONNX nodes; weights arrive in Flax layout and are laid out for ONNX here."""

    def __init__(self, helper, numpy_helper, compute_dtype):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.dtype = np.dtype(compute_dtype)
        self.nodes, self.initializers = [], []
        self._count = 0

    def _name(self, prefix):
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, value, prefix="w", dtype=None):
        name = self._name(prefix)
        array = np.asarray(value, dtype or self.dtype)
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def node(self, op, inputs, **attrs):
        out = self._name(op.lower())
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    # --- the Emitter interface of adaface_jax.deploy.graph
    def conv(self, x, kernel_hwio, stride, pad):
        w = np.ascontiguousarray(np.asarray(kernel_hwio).transpose(3, 2, 0, 1))  # HWIO -> OIHW
        kh, kw = w.shape[2:]
        return self.node("Conv", [x, self.const(w)], kernel_shape=[kh, kw], strides=[stride, stride],
                         pads=[pad, pad, pad, pad])

    def batch_norm(self, x, mean, var, scale, bias, eps):
        dtype = np.float32 if self._is_float32_stage else self.dtype
        c = np.shape(mean)[0]
        scale = np.ones(c) if scale is None else scale
        bias = np.zeros(c) if bias is None else bias
        ins = [self.const(v, "bn", dtype) for v in (scale, bias, mean, var)]
        return self.node("BatchNormalization", [x] + ins, epsilon=float(eps))

    def prelu(self, x, alpha):
        return self.node("PRelu", [x, self.const(np.asarray(alpha).reshape(-1, 1, 1), "alpha")])

    def relu(self, x):
        return self.node("Relu", [x])

    def sigmoid(self, x):
        return self.node("Sigmoid", [x])

    def add(self, a, b):
        return self.node("Add", [a, b])

    def mul(self, a, b):
        return self.node("Mul", [a, b])

    def spatial_mean(self, x):
        return self.node("ReduceMean", [x], axes=[2, 3], keepdims=1)

    def subsample(self, x, stride):
        if stride == 1:
            return x
        return self.node("MaxPool", [x], kernel_shape=[1, 1], strides=[stride, stride])

    def dense_from_nhwc_flatten(self, x, kernel, bias):
        channels = self._last_channels
        side = int(round((np.shape(kernel)[0] / channels) ** 0.5))
        w = flax_to_torch_value("dense_nchw", np.asarray(kernel), (channels, side))  # (out, C*S*S), NCHW flatten
        flat = self.node("Flatten", [x], axis=1)
        return self.node("Gemm", [flat, self.const(w), self.const(bias)], transB=1)

    def to_output_precision(self, x):
        self._is_float32_stage = True
        if self.dtype == np.float32:
            return x
        return self.node("Cast", [x], to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)))

    def l2_normalize(self, x):
        sq = self.node("Mul", [x, x])
        axes = self.const(np.array([1], np.int64), "axes", np.int64)
        norm = self.node("Sqrt", [self.node("ReduceSum", [sq, axes], keepdims=1)])
        return self.node("Div", [x, norm]), norm

    _is_float32_stage = False
    _last_channels = 0


def build_onnx_model(variables: dict, arch: str, *, width: int = 64, input_size: int = 112, layout: str = "NHWC",
                     channel_order: str = "BGR", dtype: str = "float32", include_norm: bool = True,
                     metadata: dict | None = None):
    """-> an ``onnx.ModelProto`` of the eval-mode backbone (see the module docstring)."""
    onnx, helper, numpy_helper = require_onnx()
    if dtype not in ("float32", "float16"):
        raise InputError(f"--dtype {dtype}: ONNX export supports float32 and float16")
    variables = with_input_contract(variables, channel_order)
    em = _OnnxEmitter(helper, numpy_helper, np.float16 if dtype == "float16" else np.float32)
    # the channel count the output Linear flattens = the last unit's depth
    em._last_channels = int(np.shape(variables["batch_stats"]["output_layer_0"]["mean"])[0])
    shape = ["batch", 3, input_size, input_size] if layout == "NCHW" else ["batch", input_size, input_size, 3]
    x = INPUT_NAME
    if layout == "NHWC":
        x = em.node("Transpose", [x], perm=[0, 3, 1, 2])
    elif layout != "NCHW":
        raise InputError(f"--layout {layout}: expected NHWC or NCHW")
    if dtype == "float16":
        x = em.node("Cast", [x], to=helper.np_dtype_to_tensor_dtype(np.dtype(np.float16)))
    emb, norm = walk_iresnet(em, x, variables, arch, width)
    # name the outputs
    em.nodes.append(helper.make_node("Identity", [emb], [OUTPUT_NAMES[0]], name="embedding_out"))
    outputs = [helper.make_tensor_value_info(OUTPUT_NAMES[0], onnx.TensorProto.FLOAT, ["batch", _emb_size(variables)])]
    if include_norm:
        em.nodes.append(helper.make_node("Identity", [norm], [OUTPUT_NAMES[1]], name="norm_out"))
        outputs.append(helper.make_tensor_value_info(OUTPUT_NAMES[1], onnx.TensorProto.FLOAT, ["batch", 1]))
    graph = helper.make_graph(em.nodes, f"adaface_{arch}",
                              [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, shape)],
                              outputs, em.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="adaface-jax")
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime/TensorRT releases of the last two years
    contract = input_contract(arch, input_size, layout, channel_order, dtype, include_norm, metadata)
    for key, value in contract.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model)
    return model


def _emb_size(variables) -> int:
    return int(np.shape(variables["params"]["output_layer_3"]["kernel"])[1])


def with_input_contract(variables: dict, channel_order: str) -> dict:
    """RGB input: reverse the first conv's input channels (exact, no extra op)."""
    if channel_order == "BGR":
        return variables
    if channel_order != "RGB":
        raise InputError(f"--channel-order {channel_order}: expected BGR or RGB")
    params = dict(variables["params"])
    first = dict(params["input_layer_0"])
    first["kernel"] = np.ascontiguousarray(np.asarray(first["kernel"])[:, :, ::-1, :])
    params["input_layer_0"] = first
    return {**variables, "params": params}


def input_contract(arch, input_size, layout, channel_order, dtype, include_norm, metadata=None) -> dict:
    """What the exported model expects and returns (stored in its metadata)."""
    shape = f"(batch, 3, {input_size}, {input_size})" if layout == "NCHW" else f"(batch, {input_size}, {input_size}, 3)"
    contract = {
        "producer": "adaface-jax", "arch": arch, "input": INPUT_NAME, "input_shape": shape, "layout": layout,
        "channel_order": channel_order, "input_dtype": "float32",
        "normalization": "(x/255 - 0.5) / 0.5 of uint8 pixels", "compute_dtype": dtype,
        "outputs": "embedding (batch, D) unit vectors" + ("; norm (batch, 1) feature norm = quality" if include_norm
                                                          else ""),
        "similarity": "cosine = dot product of embeddings",
    }
    if metadata and metadata.get("calibration"):
        contract["calibration"] = metadata["calibration"]
    return contract


def save_onnx(model, path: str) -> None:

    with atomic_write(path) as f:
        f.write(model.SerializeToString())
