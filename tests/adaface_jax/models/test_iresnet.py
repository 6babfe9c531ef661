"""Flax IResNet vs the PyTorch reference (tests/support/torch_reference.py) through our checkpoint mapping.

Weights AND BatchNorm running statistics are random (not the 0/1 init), so a mapping that swaps
mean/var, scale/bias or a layout would show.  Measured differences are printed (pytest -s).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from adaface_jax.convert import mapping
from adaface_jax.convert.convert import flax_shapes, state_dict_to_variables
from adaface_jax.models import build_model
from adaface_jax.models.iresnet import BottleneckIR
from tests.support.torch_reference import AdaFace, BottleneckIR as TorchBottleneck, build_backbone, randomize_

# Bounds per check, ~3-8x the differences measured on CPU (jax 0.10 / torch 2.13, printed with pytest -s):
# eval embeddings 1.4e-7-2.5e-7 (224x224: 9.4e-7), norms <= 1.3e-7 relative; train mode 2.2e-6 (running
# stats 3.2e-7); BottleneckIR 1.8e-7-2.0e-7 eval, 5.0e-7-6.6e-7 train; bn_groups=2 (BatchNorm over 2 samples)
# 1.4e-5 (stats 7.4e-7).  A BatchNorm epsilon of 1e-4 instead of 1e-5 moves them by 2.4e-5-4.6e-5 (eval),
# 3e-3 (train), 1e-4 (bottleneck eval) and 1.8e-2 (bn_groups).
TOL_EVAL_EMB, TOL_EVAL_224_EMB, TOL_NORM = 2e-6, 5e-6, 1e-6
TOL_TRAIN_EMB, TOL_STATS = 1e-5, 2e-6
TOL_BLOCK_EVAL, TOL_BLOCK_TRAIN = 1e-6, 3e-6
TOL_GROUPS_EMB, TOL_GROUPS_NORM, TOL_GROUPS_STATS = 5e-5, 2e-6, 3e-6


def _prefixed(model):
    return {"model." + k: v for k, v in model.state_dict().items()}


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _inputs(n, seed=0, size=112):
    return np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _compare(name, emb, norm, t_emb, t_norm, tol_emb=TOL_EVAL_EMB, tol_norm=TOL_NORM):
    d_emb = float(np.max(np.abs(np.asarray(emb) - t_emb.numpy())))
    d_norm = float(np.max(np.abs(np.asarray(norm) - t_norm.numpy()) / np.abs(t_norm.numpy())))
    print(f"\n[{name}] max|d emb| = {d_emb:.3g}, max rel|d norm| = {d_norm:.3g}")
    assert np.allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, atol=1e-5)
    assert d_emb <= tol_emb and d_norm <= tol_norm, (d_emb, d_norm)
    return d_emb, d_norm


@pytest.fixture(scope="module")
def torch_ir18():
    return randomize_(build_backbone("ir_18"), seed=1).eval()


@pytest.fixture(scope="module")
def torch_ir50():
    return randomize_(build_backbone("ir_50"), seed=2).eval()


def test_reference_key_counts_match_released_checkpoints():
    counts = {a: len(build_backbone(a).state_dict()) for a in ("ir_18", "ir_50", "ir_101")}
    assert counts == {"ir_18": 179, "ir_50": 467, "ir_101": 917}
    head = AdaFace(classnum=7).state_dict()
    assert sorted(head) == ["batch_mean", "batch_std", "kernel", "t"]
    sd = build_backbone("ir_50").state_dict()
    assert sum(k.endswith("running_var") for k in sd) == 78  # 77 BN2d + 1 BN1d
    shortcut_units = sorted({int(k.split(".")[1]) for k in sd if "shortcut_layer.0" in k})
    assert shortcut_units == [3, 7, 21]


@pytest.mark.parametrize("arch", ["ir_18", pytest.param("ir_50", marks=pytest.mark.slow)])
def test_eval_parity(arch, torch_ir18, torch_ir50):
    tm = {"ir_18": torch_ir18, "ir_50": torch_ir50}[arch]
    got_arch, size, variables, head, extras = state_dict_to_variables(_prefixed(tm))
    assert (got_arch, size, head, extras["num_batches_tracked"]) == (arch, 112, None, 7)
    x = _inputs(2, seed=3)
    model = build_model(arch)
    emb, norm = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    with torch.no_grad():
        t_emb, t_norm = tm(_nchw(x))
    _compare(f"{arch} eval", emb, norm, t_emb, t_norm)


def test_train_mode_parity_and_running_stats(torch_ir18):
    """train=True: batch statistics; torch updates running_var with the unbiased variance, so do we.
    Dropout is switched off on both sides (p=0 / dropout_rate=0) to compare deterministically."""
    import copy

    tm = copy.deepcopy(torch_ir18)
    _, _, variables, _, _ = state_dict_to_variables(_prefixed(tm))
    tm.train()
    tm.output_layer[1].p = 0.0
    x = _inputs(4, seed=4)
    with torch.no_grad():
        t_emb, t_norm = tm(_nchw(x))
    model = build_model("ir_18", dropout_rate=0.0)
    (emb, norm), updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    _compare("ir_18 train", emb, norm, t_emb, t_norm, tol_emb=TOL_TRAIN_EMB)
    _, _, after, _, _ = state_dict_to_variables(_prefixed(tm))
    # relative to each statistic's own scale (a mean over 4 samples can be ~0 by cancellation)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))),
                                   updates["batch_stats"], after["batch_stats"])
    worst = max(jax.tree_util.tree_leaves(diffs))
    moved = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(a - b))), variables["batch_stats"], after["batch_stats"])))
    print(f"[ir_18 train] running stats: max rel diff {worst:.3g} (stats moved by up to {moved:.3g})")
    assert moved > 1e-2 and worst <= TOL_STATS


@pytest.mark.slow
def test_ir_se_50_eval_parity():
    tm = randomize_(build_backbone("ir_se_50"), seed=5).eval()
    arch, _, variables, _, _ = state_dict_to_variables(_prefixed(tm))
    assert arch == "ir_se_50"
    x = _inputs(2, seed=6)
    model = build_model(arch)
    emb, norm = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    with torch.no_grad():
        t_emb, t_norm = tm(_nchw(x))
    _compare("ir_se_50 eval", emb, norm, t_emb, t_norm)


@pytest.mark.parametrize("use_se", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_bottleneck_block_parity(use_se, train):
    """One BottleneckIR unit (the 152/200-layer block) with a conv shortcut and stride 2."""
    tb = randomize_(TorchBottleneck(64, 256, 2, use_se), seed=7)
    tb.train(train)
    fb = BottleneckIR(64, 256, 2, use_se=use_se)
    x = _inputs(2, seed=8, size=14)
    x = np.concatenate([x] * 22, axis=-1)[..., :64]
    shapes = jax.eval_shape(lambda: fb.init(jax.random.PRNGKey(0), x, train=False))
    sd = {k: v.numpy() for k, v in tb.state_dict().items()}
    variables = {}
    for coll in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[coll])[0]:
            names = tuple(p.key for p in path)
            kind = mapping.leaf_kind(coll, names, leaf.shape)
            value = mapping.torch_to_flax_value(kind, sd[mapping.flax_leaf_to_torch_key(coll, names)])
            assert value.shape == leaf.shape
            node = variables.setdefault(coll, {})
            for n in names[:-1]:
                node = node.setdefault(n, {})
            node[names[-1]] = jnp.asarray(value)
    with torch.no_grad():
        ty = tb(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    if train:
        y, _ = fb.apply(variables, x, train=True, mutable=["batch_stats"])
    else:
        y = fb.apply(variables, x, train=False)
    d = float(np.max(np.abs(np.asarray(y) - ty)) / np.max(np.abs(ty)))
    print(f"\n[bottleneck se={use_se} train={train}] max|d| / max|y| = {d:.3g}")
    assert y.shape == ty.shape == (2, 7, 7, 256) and d <= (TOL_BLOCK_TRAIN if train else TOL_BLOCK_EVAL)


@pytest.mark.parametrize("arch", ["ir_101", "ir_152"])
def test_large_arch_key_mapping_and_shapes(arch):
    """Every key maps and every shape matches the Flax model (no forward pass: eval_shape only)."""
    tm = build_backbone(arch)
    got_arch, size, variables, _, _ = state_dict_to_variables(_prefixed(tm))
    assert (got_arch, size) == (arch, 112)
    want = flax_shapes(arch)
    got_shapes = jax.tree_util.tree_map(np.shape, variables)
    want_shapes = jax.tree_util.tree_map(lambda s: tuple(s.shape), dict(want))
    assert got_shapes == want_shapes
    n_torch = sum(1 for k in tm.state_dict() if not k.endswith("num_batches_tracked"))
    assert len(jax.tree_util.tree_leaves(variables)) == n_torch


@pytest.mark.slow
def test_input_size_224_is_inferred_and_runs():
    tm = randomize_(build_backbone("ir_18", input_size=224), seed=9).eval()
    arch, size, variables, _, _ = state_dict_to_variables(_prefixed(tm))
    assert (arch, size) == ("ir_18", 224)
    x = _inputs(1, seed=10, size=224)
    model = build_model(arch, input_size=224)
    emb, norm = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    with torch.no_grad():
        t_emb, t_norm = tm(_nchw(x))
    _compare("ir_18 224x224 eval", emb, norm, t_emb, t_norm, tol_emb=TOL_EVAL_224_EMB)


def test_bfloat16_compute_keeps_float32_params(torch_ir18):
    _, _, variables, _, _ = state_dict_to_variables(_prefixed(torch_ir18))
    x = _inputs(2, seed=11)
    model = build_model("ir_18", dtype=jnp.bfloat16)
    emb, norm = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert emb.dtype == jnp.float32 and norm.dtype == jnp.float32
    init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    assert {l.dtype for l in jax.tree_util.tree_leaves(init)} == {jnp.dtype(jnp.float32)}
    with torch.no_grad():
        t_emb, _ = torch_ir18(_nchw(x))
    cos = np.sum(np.asarray(emb) * t_emb.numpy(), axis=1)
    print(f"\n[ir_18 bf16] 1 - min cos to float32 torch = {1 - cos.min():.3g}")
    assert 1 - cos.min() < 1e-4  # measured 1.6e-5


def test_bn_groups_reproduce_per_device_batchnorm(torch_ir18):
    """bn_groups=2 in train mode = two 'GPUs' each running the reference on its half (unsynchronised
    DDP BatchNorm); the running statistics follow group 0 (rank 0's buffers)."""
    import copy

    _, _, variables, _, _ = state_dict_to_variables(_prefixed(torch_ir18))
    x = _inputs(4, seed=12)
    model = build_model("ir_18", dropout_rate=0.0, bn_groups=2)
    (emb, norm), updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    for g in range(2):
        tm = copy.deepcopy(torch_ir18).train()
        tm.output_layer[1].p = 0.0
        with torch.no_grad():
            t_emb, t_norm = tm(_nchw(x[2 * g:2 * g + 2]))
        _compare(f"ir_18 bn_groups=2 group {g}", emb[2 * g:2 * g + 2], norm[2 * g:2 * g + 2], t_emb, t_norm,
                 tol_emb=TOL_GROUPS_EMB, tol_norm=TOL_GROUPS_NORM)
        if g == 0:
            _, _, after, _, _ = state_dict_to_variables(_prefixed(tm))
            worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
                lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))),
                updates["batch_stats"], after["batch_stats"])))
            print(f"[ir_18 bn_groups=2] running stats vs group 0: max rel diff {worst:.3g}")
            assert worst <= TOL_GROUPS_STATS


def test_batchnorm_axis_name_equals_global_batch_statistics():
    """BatchNorm(axis_name=...) inside shard_map over 4 devices = torch BatchNorm2d on the whole batch,
    including the unbiased running-variance update."""
    from jax.sharding import PartitionSpec as P

    from adaface_jax.models.layers import BatchNorm

    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py sets 8 CPU devices)")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    x = np.random.RandomState(13).randn(8, 5, 5, 16).astype(np.float32) * 3 + 1
    tbn = torch.nn.BatchNorm2d(16).train()
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5)
        tbn.bias.uniform_(-0.5, 0.5)
        ty = tbn(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    bn = BatchNorm(use_running_average=False, axis_name="data")
    params = {"scale": jnp.asarray(tbn.weight.detach().numpy()), "bias": jnp.asarray(tbn.bias.detach().numpy())}
    stats = {"mean": jnp.zeros(16), "var": jnp.ones(16)}

    def local(xs, params, stats):
        y, upd = bn.apply({"params": params, "batch_stats": stats}, xs, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=(P("data"), P()),
                       check_vma=False)
    y, new_stats = jax.jit(fn)(x, params, stats)
    d = float(np.max(np.abs(np.asarray(y) - ty)))
    d_var = float(np.max(np.abs(np.asarray(new_stats["var"]) - tbn.running_var.numpy())))
    d_mean = float(np.max(np.abs(np.asarray(new_stats["mean"]) - tbn.running_mean.numpy())))
    print(f"\n[BatchNorm axis_name] max|d y| {d:.3g}, running mean {d_mean:.3g}, running var {d_var:.3g}")
    assert d <= 5e-6 and d_mean <= 1e-7 and d_var <= 1e-6  # measured 0.7e-6-1.4e-6, 1.5e-8, 1.2e-7
