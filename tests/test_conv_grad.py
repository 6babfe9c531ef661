"""The im2col-GEMM weight gradient (``adaface_jax.models.conv``, the CPU default) against a float64 brute
force, XLA's own gradient, PyTorch's autograd through the whole ir_18, and on a batch sharded over 8 devices."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from adaface_jax import parallel
from adaface_jax.convert.convert import state_dict_to_variables
from adaface_jax.errors import ConfigError
from adaface_jax.models import build_model
from adaface_jax.models import conv as cg
from adaface_jax.train.setup import build_backbone
from torch_reference import build_backbone as torch_backbone, randomize_

DN = ("NHWC", "HWIO", "NHWC")


def brute_weight_grad(x, dy, kernel_hw, strides, pads):
    """dW[i, j] = sum over (n, h, w) of x_pad[n, h*s+i, w*s+j, :] outer dy[n, h, w, :], in float64."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    _, ho, wo, co = dy.shape
    dw = np.zeros(kernel_hw + (x.shape[3], co))
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            patch = xp[:, i:i + (ho - 1) * strides[0] + 1:strides[0], j:j + (wo - 1) * strides[1] + 1:strides[1]]
            dw[i, j] = np.einsum("nhwc,nhwd->cd", patch, dy)
    return dw


CASES = [  # (N, H, W, Ci, Co, kernel, stride, pads)
    (2, 9, 9, 3, 5, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (2, 10, 10, 4, 6, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (3, 8, 8, 4, 6, (3, 3), (2, 2), ((0, 1), (0, 1))),     # Flax 'SAME' at stride 2 on an even size
    (2, 8, 6, 5, 3, (1, 1), (2, 2), ((0, 0), (0, 0))),     # the IR shortcut
    (1, 11, 7, 2, 4, (5, 3), (1, 2), ((2, 2), (1, 1))),    # non-square everything
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("column_bytes", [1, 10 ** 9])   # one band per output row (capped), or a single band
def test_weight_grad_gemm_equals_brute_force(case, column_bytes):
    n, h, w, ci, co, k, s, pads = case
    rs = np.random.RandomState(sum(case[:5]))
    x = rs.standard_normal((n, h, w, ci)).astype(np.float32)
    ho = (h + sum(pads[0]) - k[0]) // s[0] + 1
    wo = (w + sum(pads[1]) - k[1]) // s[1] + 1
    dy = rs.standard_normal((n, ho, wo, co)).astype(np.float32)
    got = np.asarray(cg.weight_grad_gemm(jnp.asarray(x), jnp.asarray(dy), k, s, pads, column_bytes=column_bytes))
    want = brute_weight_grad(x, dy, k, s, pads)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), "SAME", "VALID"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_op_forward_is_xlas_and_gradients_match(padding, stride):
    """Above the size threshold the op takes the GEMM path: the forward is XLA's bit for bit, the input
    gradient is XLA's, the weight gradient agrees with XLA's and with the brute force."""
    rs = np.random.RandomState(stride)
    x = jnp.asarray(rs.standard_normal((2, 60, 60, 4)).astype(np.float32))     # 29x29+ outputs: GEMM path
    w = jnp.asarray(rs.standard_normal((3, 3, 4, 8)).astype(np.float32) * 0.2)

    def loss(op):
        def f(x, w):
            y = op(x, w, (stride, stride), padding, dimension_numbers=DN)
            return jnp.sum(jnp.sin(y)), y
        return f

    (_, y_ref), (gx_ref, gw_ref) = jax.jit(jax.value_and_grad(loss(lax.conv_general_dilated), (0, 1), has_aux=True))(x, w)
    (_, y), (gx, gw) = jax.jit(jax.value_and_grad(loss(cg.conv_general_dilated_gemm_grad), (0, 1), has_aux=True))(x, w)
    assert "custom_vjp" in str(jax.make_jaxpr(lambda x, w: cg.conv_general_dilated_gemm_grad(
        x, w, (stride, stride), padding, dimension_numbers=DN))(x, w))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_ref), rtol=2e-5, atol=2e-5 * np.abs(gw_ref).max())
    pads = lax.padtype_to_pads((60, 60), (3, 3), (stride, stride), padding) if isinstance(padding, str) else padding
    dy = np.cos(np.asarray(y_ref, np.float64))
    np.testing.assert_allclose(np.asarray(gw), brute_weight_grad(x, dy, (3, 3), (stride, stride), pads),
                               rtol=2e-5, atol=2e-5 * np.abs(gw_ref).max())


def test_small_or_unusual_convolutions_stay_with_xla():
    """Below 28x28 outputs (3x3 kernels), and for dilated or grouped convolutions, the op is XLA's own."""
    x, w = jnp.ones((2, 14, 14, 4)), jnp.ones((3, 3, 4, 4))
    calls = [lambda x, w: cg.conv_general_dilated_gemm_grad(x, w, (1, 1), "SAME", dimension_numbers=DN),
             lambda x, w: cg.conv_general_dilated_gemm_grad(jnp.pad(x, ((0, 0), (20, 20), (20, 20), (0, 0))), w, (1, 1),
                                                           "SAME", rhs_dilation=(2, 2), dimension_numbers=DN),
             lambda x, w: cg.conv_general_dilated_gemm_grad(jnp.pad(x, ((0, 0), (20, 20), (20, 20), (0, 0))), w[:, :, :2],
                                                           (1, 1), "SAME", feature_group_count=2, dimension_numbers=DN)]
    for call in calls:
        assert "custom_vjp" not in str(jax.make_jaxpr(call)(x, w))


def test_weight_grad_choice_and_config_error():
    assert cg.resolve_weight_grad("auto", "cpu") == "gemm"
    assert cg.resolve_weight_grad("auto", "gpu") == "xla" and cg.resolve_weight_grad("auto", "tpu") == "xla"
    assert cg.resolve_weight_grad("xla", "cpu") == "xla" and cg.resolve_weight_grad("gemm", "gpu") == "gemm"
    from configs.common import get_base_config
    c = get_base_config(arch="ir_18", num_classes=10)
    assert c.model.conv_weight_grad == "auto" and build_backbone(c).conv_weight_grad == "gemm"   # tests run on CPU
    c.model.conv_weight_grad = "fast"
    with pytest.raises(ConfigError) as e:
        build_backbone(c)
    assert str(e.value) == "config.model.conv_weight_grad='fast': expected one of ('auto', 'xla', 'gemm')"


def test_sharded_batch_gives_the_single_device_gradient():
    """The batch sharded over 8 devices (bands split rows, never the batch): same weight gradient."""
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    rs = np.random.RandomState(5)
    x = rs.standard_normal((16, 32, 32, 4)).astype(np.float32)
    w = jnp.asarray(rs.standard_normal((3, 3, 4, 6)).astype(np.float32) * 0.2)

    def loss(w, x):
        return jnp.sum(jnp.tanh(cg.conv_general_dilated_gemm_grad(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)))

    one = jax.jit(jax.grad(loss))(w, jnp.asarray(x))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    many = jax.jit(jax.grad(loss))(w, xs)
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(one)).max())


def _prefixed(model):
    return {"model." + k: v for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_ir_18_gradients_match_pytorch_autograd():
    """Every parameter's gradient of a train-mode ir_18 (BatchNorm on batch statistics, dropout off) under
    both choices, against PyTorch's autograd through the reference backbone, mapped by the converter."""
    tm = randomize_(torch_backbone("ir_18"), seed=3)
    _, _, variables, _, _ = state_dict_to_variables(_prefixed(tm))
    tm.train()
    tm.output_layer[1].p = 0.0
    x = np.random.RandomState(7).uniform(-1, 1, (4, 112, 112, 3)).astype(np.float32)
    probe = np.random.RandomState(8).standard_normal((4, 512)).astype(np.float32)
    emb, norm = tm(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    (torch.sum(emb * torch.from_numpy(probe)) + 0.01 * torch.sum(norm)).backward()
    grads_sd = {k: (p.grad if p.grad is not None else p.detach()) for k, p in
                dict(tm.named_parameters(), **{n: b for n, b in tm.named_buffers()}).items()}
    want = state_dict_to_variables({"model." + k: v.detach() for k, v in grads_sd.items()})[2]["params"]

    grads = {}
    for choice in ("xla", "gemm"):
        model = build_model("ir_18", dropout_rate=0.0, conv_weight_grad=choice)

        def loss(params):
            (e, n), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                    mutable=["batch_stats"])
            return jnp.sum(e * probe) + 0.01 * jnp.sum(n)

        grads[choice] = jax.jit(jax.grad(loss))(variables["params"])

    def worst(a, b):
        # relative to each leaf's scale, floored at 1e-2: the biases of convolutions followed by a train-mode
        # BatchNorm have a zero gradient, which both sides give as float noise of ~1e-7
        rel = jax.tree_util.tree_map(lambda g, t: float(np.abs(np.asarray(g) - np.asarray(t)).max()
                                                        / max(float(np.abs(np.asarray(t)).max()), 1e-2)), a, b)
        return max(jax.tree_util.tree_leaves(rel))

    errors = {choice: worst(g, want) for choice, g in grads.items()}
    between = worst(grads["gemm"], grads["xla"])
    print(f"\n[ir_18 grads] worst relative error vs torch: {errors}; gemm vs xla: {between:.2e}")
    # Measured: 9.8e-3 for both choices vs torch (a batch of 4 through train-mode BatchNorm amplifies float
    # noise in the first stage), 1.2e-5 gemm vs xla.
    assert errors["gemm"] <= 3e-2 and errors["gemm"] <= 1.5 * errors["xla"] + 1e-4, errors
    assert 0 < between <= 1e-4, between   # a different computation (not bitwise equal), the same gradient
