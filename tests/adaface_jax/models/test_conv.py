"""The IResNet's CPU backward rewrites (``cpu_backward``): the input gradient of a strided convolution one
stride phase at a time (``models/conv.py``) and BatchNorm's closed-form gradient (``models/layers.py``),
against float64 brute force and PyTorch's autograd. The whole ir_18 is checked against PyTorch's autograd
in ``test_cpu_convolutions.py``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from adaface_jax import parallel
from adaface_jax.models.conv import conv_general_dilated_phase_grad, input_grad_by_phase
from adaface_jax.models.layers import BatchNorm, batch_norm_closed_form

DN = ("NHWC", "HWIO", "NHWC")


def brute_input_grad(dy, w, in_hw, strides, pads):
    """dx of y[n, o, p, co] = sum x_pad[n, s*o + i, s*p + j, ci] w[i, j, ci, co], scattered tap by tap."""
    dy, w = dy.astype(np.float64), w.astype(np.float64)
    n, ho, wo, _ = dy.shape
    kh, kw, ci, _ = w.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    dx_pad = np.zeros((n, in_hw[0] + pt + pb, in_hw[1] + pl + pr, ci))
    for i in range(kh):
        for j in range(kw):
            dx_pad[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += dy @ w[i, j].T
    return dx_pad[:, pt:pt + in_hw[0], pl:pl + in_hw[1]]


# (input H, W), kernel (kh, kw), strides, explicit pads
GEOMETRIES = [
    ((9, 9), (3, 3), (2, 2), ((1, 1), (1, 1))),      # the IResNet's strided 3x3
    ((8, 7), (3, 3), (2, 2), ((0, 1), (1, 0))),      # asymmetric padding
    ((8, 8), (3, 3), (2, 2), ((0, 0), (0, 0))),      # the last row and column get no gradient
    ((7, 7), (1, 1), (2, 2), ((0, 0), (0, 0))),      # the 1x1 shortcut
    ((10, 11), (5, 3), (3, 2), ((2, 1), (0, 2))),    # stride 3 x 2, a 5x3 kernel
    ((6, 6), (2, 2), (2, 2), ((0, 0), (0, 0))),      # kernel = stride: one tap per phase
    ((7, 5), (1, 1), (3, 3), ((0, 0), (0, 0))),      # kernel < stride: phases no tap reaches
    ((9, 8), (3, 3), (2, 1), ((1, 1), (1, 1))),      # strided along one axis only
]


@pytest.mark.parametrize("in_hw,kernel,strides,pads", GEOMETRIES)
def test_input_grad_by_phase_matches_brute_force(in_hw, kernel, strides, pads):
    rs = np.random.RandomState(0)
    x = rs.standard_normal((2,) + in_hw + (3,)).astype(np.float32)
    w = rs.standard_normal(kernel + (3, 5)).astype(np.float32)
    y = lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN)
    dy = rs.standard_normal(y.shape).astype(np.float32)
    got = np.asarray(input_grad_by_phase(jnp.asarray(dy), jnp.asarray(w), in_hw, strides, pads))
    want = brute_input_grad(dy, w, in_hw, strides, pads)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 1), (1, 1)), ((2, 0), (0, 1))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_op_forward_is_xla_and_gradients_match_autodiff(padding, dtype):
    """The drop-in op: the forward is ``lax.conv_general_dilated`` bit for bit; both gradients agree with
    autodiff's (the weight gradient is autodiff's own)."""
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.standard_normal((3, 12, 13, 4)), dtype)
    w = jnp.asarray(rs.standard_normal((3, 3, 4, 6)) * 0.3, dtype)

    def f(conv):
        return lambda x, w: conv(x, w, (2, 2), padding, dimension_numbers=DN)

    ours, ref = f(conv_general_dilated_phase_grad), f(lax.conv_general_dilated)
    y = ours(x, w)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref(x, w), np.float32))
    probe = jnp.asarray(rs.standard_normal(y.shape), dtype)
    g = jax.grad(lambda x, w: jnp.sum((ours(x, w) * probe).astype(jnp.float32)), argnums=(0, 1))(x, w)
    r = jax.grad(lambda x, w: jnp.sum((ref(x, w) * probe).astype(jnp.float32)), argnums=(0, 1))(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(g, r):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())


def test_other_convolutions_are_xla_unchanged():
    """Stride 1, dilated, grouped and non-NHWC convolutions are ``lax.conv_general_dilated`` itself."""
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    cases = [
        dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN),
        dict(window_strides=(2, 2), padding="SAME", rhs_dilation=(2, 2), dimension_numbers=DN),
        dict(window_strides=(2, 2), padding="SAME", dimension_numbers=DN, feature_group_count=2),
        dict(window_strides=(2, 2), padding="SAME"),  # NCHW/OIHW by default
        dict(window_strides=(2, 2), padding=((-1, 0), (0, 0)), dimension_numbers=DN),  # a crop
    ]
    for kw in cases:
        rhs = w[:, :, :2] if kw.get("feature_group_count") else w
        lhs = x.transpose(0, 3, 1, 2) if "dimension_numbers" not in kw else x
        rhs = rhs.transpose(3, 2, 0, 1) if "dimension_numbers" not in kw else rhs
        jaxpr = str(jax.make_jaxpr(lambda a, b: conv_general_dilated_phase_grad(a, b, **kw))(lhs, rhs))
        assert "custom_vjp" not in jaxpr, kw
    jaxpr = str(jax.make_jaxpr(lambda a, b: conv_general_dilated_phase_grad(a, b, (2, 2), "SAME",
                                                                            dimension_numbers=DN))(x, w))
    assert "custom_vjp" in jaxpr


def test_sharded_batch_gives_the_single_device_gradient():
    """With the batch sharded over 8 devices the phase convolutions stay per-device: the only collective is
    the weight gradient's all-reduce, as with autodiff's gradient, and the gradients are the single-device
    ones."""
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    rs = np.random.RandomState(2)
    x = rs.standard_normal((8, 14, 14, 4)).astype(np.float32)
    w = rs.standard_normal((3, 3, 4, 8)).astype(np.float32) * 0.3
    probe = rs.standard_normal((8, 7, 7, 8)).astype(np.float32)

    def grad_fn(conv):
        def loss(x, w):
            return jnp.sum(conv(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN) * probe)
        return jax.grad(loss, argnums=(0, 1))

    want = jax.jit(grad_fn(conv_general_dilated_phase_grad))(x, w)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    shardings = (NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))
    collectives = {}
    for conv in (conv_general_dilated_phase_grad, lax.conv_general_dilated):
        f = jax.jit(grad_fn(conv), out_shardings=shardings)
        text = f.lower(xs, w).compile().as_text()
        collectives[conv] = sorted(line.split("=", 1)[1].split("(")[0].strip() for line in text.splitlines()
                                   if any(c in line for c in ("all-gather(", "all-reduce(", "all-to-all(",
                                                              "collective-permute(", "reduce-scatter(")))
    assert collectives[conv_general_dilated_phase_grad] == collectives[lax.conv_general_dilated] == [
        "f32[3,3,4,8]{3,2,1,0} all-reduce"], collectives
    got = jax.jit(grad_fn(conv_general_dilated_phase_grad), out_shardings=shardings)(xs, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * np.abs(np.asarray(b)).max())


def torch_batch_norm_grads(x, scale, bias, probe, groups):
    """Float64 PyTorch autograd of sum(batch_norm(x) * probe), each of ``groups`` contiguous batch chunks
    normalised with its own statistics (what per-GPU DDP BatchNorm computes)."""
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    channels_first = tx.movedim(-1, 1)  # NHWC -> NCHW (or NC for 2-D)
    ys = [torch.nn.functional.batch_norm(c, None, None, ts, tb, training=True, eps=1e-5)
          for c in torch.chunk(channels_first, groups)]
    y = torch.cat(ys).movedim(1, -1)
    (y * torch.tensor(probe, dtype=torch.float64)).sum().backward()
    return y.detach().numpy(), tx.grad.numpy(), ts.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("shape,groups", [((8, 5, 6, 4), 1), ((8, 5, 6, 4), 2), ((12, 16), 3)])
def test_batch_norm_closed_form_matches_pytorch_autograd(shape, groups):
    rs = np.random.RandomState(3)
    x = (rs.standard_normal(shape) * 3 + 1.5).astype(np.float32)
    scale = rs.uniform(0.5, 2, shape[-1]).astype(np.float32)
    bias = rs.standard_normal(shape[-1]).astype(np.float32)
    probe = rs.standard_normal(shape).astype(np.float32)
    want_y, *want = torch_batch_norm_grads(x, scale, bias, probe, groups)

    def loss(x, s, b):
        y, mean, var = batch_norm_closed_form(x, s, b, groups, 1e-5, jnp.float32)
        return jnp.sum(y * probe) + 0.0 * jnp.sum(lax.stop_gradient(mean) + lax.stop_gradient(var)), y

    (_, y), got = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=0, atol=1e-5 * np.abs(want_y).max())
    for name, a, b in zip(("dx", "dscale", "dbias"), got, want):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5 * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_module_closed_form_equals_autodiff(affine, dtype):
    """``BatchNorm(closed_form_backward=True)``: the same output and running statistics as autodiff's module,
    and the same gradients for the input and the scale and bias (bf16 input: to bf16 rounding)."""
    rs = np.random.RandomState(4)
    x = jnp.asarray(rs.standard_normal((6, 4, 4, 8)) * 2 + 1, dtype)
    probe = jnp.asarray(rs.standard_normal(x.shape), jnp.float32)
    mods = {cf: BatchNorm(use_running_average=False, num_groups=2, use_scale=affine, use_bias=affine,
                          closed_form_backward=cf) for cf in (False, True)}
    variables = mods[False].init(jax.random.PRNGKey(0), x)
    if affine:
        variables = {"params": {"scale": jnp.asarray(rs.uniform(0.5, 2, 8), jnp.float32),
                                "bias": jnp.asarray(rs.standard_normal(8), jnp.float32)},
                     "batch_stats": variables["batch_stats"]}
    out = {}
    for cf, mod in mods.items():
        def loss(params, x):
            y, upd = mod.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y.astype(jnp.float32) * probe), (y, upd["batch_stats"])
        (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables.get("params", {}), x)
        out[cf] = (y, stats, grads)
    (y0, s0, g0), (y1, s1, g1) = out[False], out[True]
    assert y1.dtype == y0.dtype == dtype and g1[1].dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y0, np.float32), rtol=0, atol=tol * 4)
    for k in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(s1[k]), np.asarray(s0[k]), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())
