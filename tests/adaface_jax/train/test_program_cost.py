"""program_cost.model_flops: the model FLOPs behind MFU and the dry run's GFLOP per image, checked against
XLA's own HLO cost analysis (on CPU it counts every convolution and dot; on GPU it does not, which is why we
count on the jaxpr) and against hand-computed counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from adaface_jax import parallel
from adaface_jax.train.program_cost import model_flops

# (height, kernel, stride, padding, in, out, groups): SAME, explicit symmetric and asymmetric padding,
# 1x1 stride 2 (IResNet's shortcut), 5x5, depthwise.
GEOMETRIES = [(9, 3, 1, "SAME", 3, 5, 1), (9, 3, 2, ((1, 1), (1, 1)), 3, 5, 1), (10, 3, 2, ((0, 1), (2, 0)), 4, 6, 2),
              (8, 1, 2, "VALID", 4, 6, 1), (7, 5, 1, ((2, 2), (2, 2)), 2, 3, 1), (12, 3, 2, "SAME", 4, 4, 4)]


def _xla_flops(fn, *args):
    """XLA's HLO cost analysis of ``fn`` lowered for the CPU: counts every convolution and dot."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _conv(stride, padding, groups):
    return lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding, feature_group_count=groups,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _eqns(jaxpr):
    """Every equation of a jaxpr and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in (v if isinstance(v, tuple) else (v,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _each_matmul_against_xla(fn, *args):
    """For every convolution and dot of ``fn``'s jaxpr (gradients included): our count of that one
    equation against XLA's count of a program that is that equation alone. Returns how many were checked."""
    checked = 0
    closed = fn.trace(*args).jaxpr if hasattr(fn, "trace") else jax.make_jaxpr(fn)(*args)
    for eqn in _eqns(closed.jaxpr):
        if eqn.primitive.name not in ("conv_general_dilated", "dot_general"):
            continue
        specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]

        def alone(*a, eqn=eqn):
            return eqn.primitive.bind(*a, **eqn.params)

        assert model_flops(alone, *specs) == _xla_flops(alone, *specs), (eqn.primitive.name, eqn.params)
        checked += 1
    return checked


@pytest.mark.parametrize("h,k,s,pad,cin,cout,g", GEOMETRIES)
def test_convolution_and_both_gradients_match_xla(h, k, s, pad, cin, cout, g):
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(2, h, h + 1, cin), jnp.float32)
    w = jnp.asarray(rs.randn(k, k, cin // g, cout), jnp.float32)
    f = _conv(s, pad, g)
    assert model_flops(f, x, w) == _xla_flops(f, x, w)
    y, vjp = jax.vjp(f, x, w)
    # The input gradient (a convolution over the output gradient, dilated by the stride) and the weight
    # gradient (a convolution of the input with the output gradient), each against XLA's count.
    assert _each_matmul_against_xla(lambda x, w, dy: jax.vjp(f, x, w)[1](dy), x, w, y) == 3


def test_hand_counts_for_stride_one_same_convolution_and_dense():
    """No padding excluded for a 1x1 kernel: forward = 2 N H W Cin Cout exactly, and its two gradients are
    the same count again each; a dense layer is 2 m k n, also three times over in a train step."""
    x, w, d = jnp.ones((2, 6, 5, 3)), jnp.ones((1, 1, 3, 4)), jnp.ones((6 * 5 * 4, 7))

    def f(x, w, d):
        return jnp.sum(_conv(1, "SAME", 1)(x, w).reshape(2, -1) @ d)

    forward = 2 * (2 * 6 * 5 * 3 * 4) + 2 * (2 * 120 * 7)
    assert model_flops(f, x, w, d) == forward
    assert model_flops(jax.grad(f, argnums=(0, 1, 2)), x, w, d) == 3 * forward
    # Gradient for the weights only: the input gradient of the conv is not computed.
    assert model_flops(jax.grad(f, argnums=(1, 2)), x, w, d) == 3 * forward - 2 * (2 * 6 * 5 * 3 * 4)


def test_batched_dot_scan_and_cond():
    a, b = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))
    bmm = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)  # noqa: E731
    assert model_flops(bmm, a, b) == 2 * 3 * 4 * 5 * 6 == _xla_flops(bmm, a, b)

    m = jnp.ones((8, 8))

    def looped(m):
        return lax.scan(lambda c, _: (c @ m, None), m, None, length=5)[0]

    assert model_flops(looped, m) == 5 * 2 * 8 ** 3

    def branch(p, m):
        return lax.cond(p, lambda m: m @ m @ m, lambda m: m, m)

    assert model_flops(branch, True, m) == 2 * 2 * 8 ** 3  # the costlier branch


def test_ir18_train_step_every_matmul_matches_xla_and_count_is_global():
    """The real train step (ir_18 at width 8, bfloat16, AdaFace head, 8 simulated devices): every convolution
    and dot of the forward and backward against XLA's count of it alone; the total is the same on 1 and 8
    devices (model FLOPs of the global batch, not of one device's share)."""
    from configs.common import get_base_config  # noqa: PLC0415
    from adaface_jax.train.setup import build_trainer  # noqa: PLC0415

    def step_flops(devices):
        c = get_base_config(arch="ir_18", num_classes=64)
        c.model.width, c.data.image_size, c.global_batch_size, c.precision = 8, 32, 8, "bfloat16"
        mesh = parallel.make_mesh(devices)
        trainer = build_trainer(c, mesh, steps_per_epoch=10, abstract=True)
        bs = parallel.batch_sharding(mesh)
        batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32, sharding=bs),
                 "label": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=bs)}
        return trainer, batch, model_flops(trainer.step, trainer.state, batch)

    trainer, batch, eight = step_flops(jax.devices()[:8])
    assert eight == step_flops(jax.devices()[:1])[2]
    # 20 convolutions forward, two gradients each except the stem's input gradient; plus the head's dots.
    assert _each_matmul_against_xla(trainer.step, trainer.state, batch) >= 20 * 3 - 1
