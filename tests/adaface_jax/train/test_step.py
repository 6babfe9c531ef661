"""train_step semantics: gradient accumulation, non-finite skipping, class padding, mixed precision."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaface_jax import heads
from adaface_jax.train import optimizer as optim
from adaface_jax.train.state import create_train_state, init_variables
from adaface_jax.heads import softmax_cross_entropy
from adaface_jax.train.step import StepConfig, make_loss_fn, make_train_step
from tests.support.train_fixtures import TinyNet, random_batch

C, E = 12, 16
ADA = dict(m=0.4, h=0.333, s=64.0, t_alpha=0.01)


def _state(model, num_classes=C, padded=None, lr=0.1, seed=0):
    params, bs, hs = init_variables(model, jax.random.PRNGKey(seed), num_classes, padded_classes=padded,
                                    image_size=16, embedding_size=E)
    tx = optim.make_optimizer(optax.constant_schedule(lr), params, bs)
    return create_train_state(params, bs, hs, tx, jax.random.PRNGKey(1))


def _close(a, b, atol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def test_accumulation_equals_large_batch_without_batch_statistics():
    # No BatchNorm and CosFace (no norm statistics): nothing depends on how the batch is split.
    model = TinyNet(embedding_size=E, use_bn=False)
    batch = random_batch(0, 16, C)
    cfg = dict(head="cosface", head_kwargs=dict(m=0.4, s=64.0), num_classes=C)
    big = jax.jit(make_train_step(model, StepConfig(**cfg)))
    acc = jax.jit(make_train_step(model, StepConfig(**cfg, accum_steps=4)))
    s_big, m_big = big(_state(model), batch)
    s_acc, m_acc = acc(_state(model), batch)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-5)
    _close(s_acc.params, s_big.params)
    _close(s_acc.opt_state, s_big.opt_state)
    moved = np.abs(np.asarray(s_big.params["head"]["kernel"]) - np.asarray(_state(model).params["head"]["kernel"]))
    assert moved.max() > 1e-3


def test_accumulation_with_batchnorm_is_mean_of_sequential_microbatch_gradients():
    """The documented semantics: micro-batch i = rows i::k, run in order, each updating BN running stats
    and the AdaFace EMA; the update uses the mean of the k gradients."""
    model = TinyNet(embedding_size=E)
    batch = random_batch(1, 8, C)
    k = 2
    state = _state(model)
    s_acc, _ = jax.jit(make_train_step(model, StepConfig(head="adaface", head_kwargs=ADA, num_classes=C,
                                                         accum_steps=k)))(state, batch)

    loss_fn = make_loss_fn(model, StepConfig(head="adaface", head_kwargs=ADA, num_classes=C))
    grad_fn = jax.grad(loss_fn, has_aux=True)
    bs, hs, grads = state.batch_stats, state.head_state, []
    rng = jax.random.fold_in(state.rng, state.step)
    for i in range(k):
        g, (bs, hs, _) = grad_fn(state.params, bs, hs, batch["image"][i::k], batch["label"][i::k],
                                 jax.random.fold_in(rng, i))
        grads.append(g)
    mean_grad = jax.tree_util.tree_map(lambda *g: sum(g) / k, *grads)
    updates, _ = state.tx.update(mean_grad, state.opt_state, state.params)
    _close(s_acc.params, optax.apply_updates(state.params, updates))
    _close(s_acc.batch_stats, bs)
    _close(s_acc.head_state, hs)


def test_non_finite_step_is_skipped_and_counted():
    model = TinyNet(embedding_size=E)
    step = jax.jit(make_train_step(model, StepConfig(head="adaface", head_kwargs=ADA, num_classes=C)))
    state = _state(model)
    bad = random_batch(2, 8, C)
    bad["image"][3, 0, 0, 0] = np.nan
    s1, m1 = step(state, bad)
    assert int(m1["skipped"]) == 1 and int(s1.skipped_in_row) == 1 and int(s1.skipped_total) == 1
    assert int(s1.step) == 1  # the data position still advances
    for field in ("params", "batch_stats", "head_state", "opt_state"):
        _close(getattr(s1, field), getattr(state, field), atol=0)
    s2, _ = step(s1, bad)
    assert int(s2.skipped_in_row) == 2
    s3, m3 = step(s2, random_batch(3, 8, C))
    assert int(m3["skipped"]) == 0 and int(s3.skipped_in_row) == 0 and int(s3.skipped_total) == 2
    assert not np.allclose(np.asarray(s3.params["head"]["kernel"]), np.asarray(state.params["head"]["kernel"]))


def test_masked_cross_entropy_equals_unpadded_softmax():
    rs = np.random.RandomState(0)
    logits = rs.standard_normal((5, 10)).astype(np.float32) * 10
    labels = rs.randint(0, 7, 5)
    want = np.mean(-jax.nn.log_softmax(logits[:, :7])[np.arange(5), labels])
    np.testing.assert_allclose(float(softmax_cross_entropy(logits, labels, 7)), want, rtol=1e-6)


def test_padded_classes_do_not_change_the_step():
    # 12 real classes padded to 16: same loss and same updates of the real columns and the backbone.
    model = TinyNet(embedding_size=E)
    cfg = StepConfig(head="adaface", head_kwargs=ADA, num_classes=C)
    batch = random_batch(4, 8, C)
    s_pad, m_pad = jax.jit(make_train_step(model, cfg))(_state(model, padded=16), batch)
    s_raw, m_raw = jax.jit(make_train_step(model, cfg))(_state(model), batch)
    np.testing.assert_allclose(float(m_pad["loss"]), float(m_raw["loss"]), rtol=1e-6)
    _close(s_pad.params["backbone"], s_raw.params["backbone"])
    _close(s_pad.params["head"]["kernel"][:, :C], s_raw.params["head"]["kernel"])
    # padding columns only see weight decay: p <- p - lr * wd * p on the first step
    pad0 = np.asarray(_state(model, padded=16).params["head"]["kernel"][:, C:])
    np.testing.assert_allclose(np.asarray(s_pad.params["head"]["kernel"][:, C:]), pad0 * (1 - 0.1 * 5e-4), rtol=1e-6)


def test_bfloat16_backbone_keeps_float32_params_and_loss():
    f32, bf16 = TinyNet(embedding_size=E), TinyNet(embedding_size=E, dtype=jnp.bfloat16)
    cfg = StepConfig(head="adaface", head_kwargs=ADA, num_classes=C)
    batch = random_batch(5, 8, C)
    s16, m16 = jax.jit(make_train_step(bf16, cfg))(_state(bf16), batch)
    s32, m32 = jax.jit(make_train_step(f32, cfg))(_state(f32), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s16.params))
    assert m16["loss"].dtype == jnp.float32
    assert isinstance(s16.head_state, heads.AdaFaceState)
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=3e-2)
    # but the computation really was lower precision
    assert float(m16["loss"]) != float(m32["loss"])
