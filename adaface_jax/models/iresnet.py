"""IResNet / IR-SE backbones of AdaFace (Deng et al.'s "improved ResNet" as in AdaFace's net.py).

Submodule names mirror the PyTorch state_dict keys so the conversion is a renaming:
``model.body.3.res_layer.1.weight`` <-> ``params/body_3/res_layer_1/kernel``.  The whole mapping
is written down once, in ``adaface_jax/convert/mapping.py``.

Input: NHWC float, **BGR**, ``(x/255 - 0.5)/0.5``, 112x112 (or 224x224).
Output: ``(embedding, norm)``; embedding L2-normalised (no epsilon, like the original), norm (N, 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from adaface_jax.models.conv import conv_general_dilated_phase_grad
from adaface_jax.models.layers import BatchNorm, PReLU, SEModule, conv_kernel_init_torch_fan_out


@dataclasses.dataclass(frozen=True)
class StageSpec:
    in_channel: int
    depth: int
    num_units: int


def stage_specs(num_layers: int, width: int = 64) -> list[StageSpec]:
    """The four stages of the original ``get_blocks``; the first unit of each has stride 2.

    ``width`` scales every channel count (64 = the published networks); a narrower network
    (e.g. 16) is only for CPU demos and tests -- no released checkpoint has one."""
    basic = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3]}
    bottleneck = {152: [3, 8, 36, 3], 200: [3, 24, 36, 3]}
    if num_layers in basic:
        chans = [(64, 64), (64, 128), (128, 256), (256, 512)]
        units = basic[num_layers]
    elif num_layers in bottleneck:
        chans = [(64, 256), (256, 512), (512, 1024), (1024, 2048)]
        units = bottleneck[num_layers]
    else:
        raise ValueError(f"num_layers must be one of 18, 34, 50, 100, 152, 200, got {num_layers}")
    if width != 64:
        if width <= 0 or width % 4:
            raise ValueError(f"width must be a positive multiple of 4, got {width}")
        chans = [(i * width // 64, d * width // 64) for i, d in chans]
    return [StageSpec(i, d, n) for (i, d), n in zip(chans, units)]


def unit_strides(num_layers: int, width: int = 64) -> list[tuple[int, int, int]]:
    """(in_channel, depth, stride) for every unit of the body, in state_dict order."""
    out = []
    for st in stage_specs(num_layers, width):
        out.append((st.in_channel, st.depth, 2))
        out.extend((st.depth, st.depth, 1) for _ in range(st.num_units - 1))
    return out


class _Common(nn.Module):
    """Fields every block shares (kept in one place so blocks stay short)."""

    in_channel: int
    depth: int
    stride: int
    use_se: bool = False
    bn_groups: int = 1
    axis_name: Optional[str] = None
    dtype: Any = jnp.float32
    cpu_backward: bool = False

    def conv(self, features, kernel, stride, name, padding):
        op = conv_general_dilated_phase_grad if self.cpu_backward else lax.conv_general_dilated  # strided ones only
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, use_bias=False,
                       kernel_init=conv_kernel_init_torch_fan_out(), dtype=self.dtype, param_dtype=jnp.float32,
                       conv_general_dilated=op, name=name)

    def bn(self, name, train):
        return BatchNorm(use_running_average=not train, num_groups=self.bn_groups, axis_name=self.axis_name,
                         dtype=self.dtype, closed_form_backward=self.cpu_backward, name=name)

    def shortcut(self, x, train):
        if self.in_channel == self.depth:
            # MaxPool2d(kernel_size=1, stride): plain subsampling.
            return x[:, :: self.stride, :: self.stride, :]
        y = self.conv(self.depth, 1, self.stride, "shortcut_layer_0", "VALID")(x)
        return self.bn("shortcut_layer_1", train)(y)


PAD1 = ((1, 1), (1, 1))  # symmetric padding; Flax 'SAME' pads (0, 1) for stride 2 on even sizes


class BasicBlockIR(_Common):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN [- SE], plus shortcut; no activation after add."""

    @nn.compact
    def __call__(self, x, train: bool):
        r = self.bn("res_layer_0", train)(x)
        r = self.conv(self.depth, 3, 1, "res_layer_1", PAD1)(r)
        r = self.bn("res_layer_2", train)(r)
        r = PReLU(name="res_layer_3")(r)
        r = self.conv(self.depth, 3, self.stride, "res_layer_4", PAD1)(r)
        r = self.bn("res_layer_5", train)(r)
        if self.use_se:
            r = SEModule(self.depth, 16, dtype=self.dtype, name="res_layer_se_block")(r)
        return r + self.shortcut(x, train)


class BottleneckIR(_Common):
    """BN - 1x1 - BN - PReLU - 3x3 - BN - PReLU - 1x1(stride) - BN [- SE], for 152/200 layers."""

    @nn.compact
    def __call__(self, x, train: bool):
        mid = self.depth // 4
        r = self.bn("res_layer_0", train)(x)
        r = self.conv(mid, 1, 1, "res_layer_1", "VALID")(r)
        r = self.bn("res_layer_2", train)(r)
        r = PReLU(name="res_layer_3")(r)
        r = self.conv(mid, 3, 1, "res_layer_4", PAD1)(r)
        r = self.bn("res_layer_5", train)(r)
        r = PReLU(name="res_layer_6")(r)
        r = self.conv(self.depth, 1, self.stride, "res_layer_7", "VALID")(r)
        r = self.bn("res_layer_8", train)(r)
        if self.use_se:
            r = SEModule(self.depth, 16, dtype=self.dtype, name="res_layer_se_block")(r)
        return r + self.shortcut(x, train)


class IResNet(nn.Module):
    """AdaFace backbone.  ``__call__(x, train)`` -> ``(embedding, norm)``.

    Attributes:
      num_layers: 18, 34, 50, 100, 152 or 200.
      use_se: IR-SE variant.
      input_size: 112 or 224 (the output Linear sees 7x7 or 14x14).
      embedding_size: 512 in every released model.
      width: channels of the first stage (64 in every released model; narrower only for demos).
      dropout_rate: 0.4 before the output Linear (train mode only; rng collection 'dropout').
      dtype: compute dtype (bfloat16 for training); parameters and BatchNorm statistics stay float32
        and the embedding/norm are returned in float32.
      bn_groups: 1 = statistics over the whole (global) batch; k = per-group statistics, the
        per-device behaviour of the original when k equals the number of devices.
      axis_name: named axis to synchronise BatchNorm over inside ``shard_map``/``pmap``.
      cpu_backward: the backward rewrites XLA:CPU runs faster -- the input gradient of strided convolutions
        one stride phase at a time (``models/conv.py``) and BatchNorm's closed-form gradient
        (``layers.batch_norm_closed_form``). The same parameters and outputs, the same gradients up to float
        rounding; the trainer builder turns it on with ``config.cpu_convolutions='eigen'`` on the CPU.
    """

    num_layers: int = 50
    use_se: bool = False
    input_size: int = 112
    embedding_size: int = 512
    width: int = 64
    dropout_rate: float = 0.4
    dtype: Any = jnp.float32
    bn_groups: int = 1
    axis_name: Optional[str] = None
    cpu_backward: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4 or x.shape[1:3] != (self.input_size, self.input_size) or x.shape[3] != 3:
            raise ValueError(f"IResNet expects NHWC BGR images of shape (N, {self.input_size}, "
                             f"{self.input_size}, 3), got {tuple(x.shape)}")
        ura = not train
        common = dict(bn_groups=self.bn_groups, axis_name=self.axis_name, dtype=self.dtype,
                      cpu_backward=self.cpu_backward)
        bn_kw = dict(num_groups=self.bn_groups, axis_name=self.axis_name, dtype=self.dtype,
                     closed_form_backward=self.cpu_backward)
        x = x.astype(self.dtype)
        x = nn.Conv(self.width, (3, 3), padding=PAD1, use_bias=False, kernel_init=conv_kernel_init_torch_fan_out(),
                    dtype=self.dtype, param_dtype=jnp.float32, name="input_layer_0")(x)
        x = BatchNorm(use_running_average=ura, name="input_layer_1", **bn_kw)(x)
        x = PReLU(name="input_layer_2")(x)

        block_cls = BasicBlockIR if self.num_layers <= 100 else BottleneckIR
        for k, (cin, depth, stride) in enumerate(unit_strides(self.num_layers, self.width)):
            x = block_cls(cin, depth, stride, use_se=self.use_se, name=f"body_{k}", **common)(x, train)

        x = BatchNorm(use_running_average=ura, name="output_layer_0", **bn_kw)(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        # PyTorch flattens NCHW; we flatten NHWC and the conversion permutes the Linear's rows.
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.embedding_size, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                     name="output_layer_3")(x)
        x = BatchNorm(use_running_average=ura, use_scale=False, use_bias=False, name="output_layer_4",
                      **{**bn_kw, "dtype": jnp.float32})(x)
        x = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True))
        return x / norm, norm


ARCHS = {
    **{f"ir_{n}": dict(num_layers=(100 if n == 101 else n), use_se=False) for n in (18, 34, 50, 101, 152, 200)},
    **{f"ir_se_{n}": dict(num_layers=(100 if n == 101 else n), use_se=True) for n in (50, 101, 152, 200)},
}


def build_model(name: str, **overrides) -> IResNet:
    """``build_model("ir_50")`` -> the IResNet of that name; keyword overrides (dtype, bn_groups, ...)."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; expected one of {sorted(ARCHS)}")
    return IResNet(**{**ARCHS[name], **overrides})
