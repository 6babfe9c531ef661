"""The mechanism: the oracle and first-batch head options, and the gradient scale per quality third against finite
differences."""
import jax.numpy as jnp
import numpy as np
import pytest

from adaface_jax import heads
from adaface_jax.miniature import mechanism
from tests.support.train_fixtures import TinyNet, random_batch


# --- heads: the oracle and the first-batch statistics --------------------------------------------------------

def _head_inputs(b=6, c=3, seed=0):
    r = np.random.default_rng(seed)
    emb = r.normal(size=(b, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    kernel = r.normal(size=(4, c)).astype(np.float32)
    labels = np.arange(b) % c
    return emb, kernel, labels


def _adaface_target_by_hand(emb, kernel, labels, scaler, m=0.4, s=64.0):
    w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cos = np.clip(emb @ w, -1 + 1e-3, 1 - 1e-3)[np.arange(len(labels)), labels]
    theta = np.clip(np.arccos(cos) - m * scaler, 1e-3, np.pi - 1e-3)
    return s * (np.cos(theta) - m - m * scaler)  # paper Eq. 7 with the original's clips


def test_oracle_scaler_is_the_standardised_true_quality():
    emb, kernel, labels = _head_inputs()
    norms = np.array([[5.0], [18.0], [21.0], [22.5], [30.0], [60.0]], np.float32)
    quality = np.array([1.0, 0.1, 1.0, 0.3, 1.0, 0.0], np.float32)  # unrelated to the norms
    state = heads.AdaFaceState(batch_mean=jnp.full((1,), 22.0), batch_std=jnp.full((1,), 4.0))
    logits, new_state = heads.adaface_logits(jnp.asarray(emb), jnp.asarray(norms), jnp.asarray(labels),
                                             jnp.asarray(kernel), state, t_alpha=0.5, quality=jnp.asarray(quality))
    z = (quality - quality.mean()) / (np.std(quality, ddof=1) + 1e-3)
    scaler = np.clip(0.333 * z, -1, 1)
    np.testing.assert_allclose(np.asarray(logits)[np.arange(6), labels], _adaface_target_by_hand(emb, kernel, labels,
                                                                                                scaler), rtol=2e-5)
    # the norm statistics still follow the norms
    assert float(new_state.batch_mean[0]) == pytest.approx(0.5 * norms.mean() + 0.5 * 22.0, rel=1e-6)
    assert float(new_state.batch_std[0]) == pytest.approx(0.5 * np.std(norms, ddof=1) + 0.5 * 4.0, rel=1e-6)
    np.testing.assert_allclose(mechanism.standardised_scaler(quality, 0.333), scaler, rtol=1e-6)


def test_first_batch_statistics_replace_the_unset_state_then_blend():
    emb, kernel, labels = _head_inputs()
    assert float(heads.initial_state("adaface").batch_std[0]) == 100.0  # the original's start by default
    state = heads.initial_state("adaface", stats_from_first_batch=True)
    assert np.isnan(float(state.batch_mean[0]))
    norms1 = np.array([[5.0], [18.0], [21.0], [22.5], [30.0], [60.0]], np.float32)
    logits, state1 = heads.adaface_logits(jnp.asarray(emb), jnp.asarray(norms1), jnp.asarray(labels),
                                          jnp.asarray(kernel), state, t_alpha=0.01)
    mean1, std1 = norms1.mean(), np.std(norms1, ddof=1)
    assert float(state1.batch_mean[0]) == pytest.approx(mean1, rel=1e-6)
    assert float(state1.batch_std[0]) == pytest.approx(std1, rel=1e-6)
    scaler = np.clip(0.333 * (norms1[:, 0] - mean1) / (std1 + 1e-3), -1, 1)
    np.testing.assert_allclose(np.asarray(logits)[np.arange(6), labels],
                               _adaface_target_by_hand(emb, kernel, labels, scaler), rtol=2e-5)
    norms2 = norms1 + 3.0
    _, state2 = heads.adaface_logits(jnp.asarray(emb), jnp.asarray(norms2), jnp.asarray(labels), jnp.asarray(kernel),
                                     state1, t_alpha=0.01)
    assert float(state2.batch_mean[0]) == pytest.approx(0.01 * norms2.mean() + 0.99 * mean1, rel=1e-6)


def test_the_step_feeds_each_micro_batch_its_own_rows_quality():
    """An oracle step with accumulation (micro-batch i = rows i::k) against the loss function run on those rows
    with their qualities; a step without 'quality' is AdaFace's own."""
    import jax
    import optax

    from adaface_jax.train import optimizer as optim
    from adaface_jax.train.state import create_train_state, init_variables
    from adaface_jax.train.step import StepConfig, make_loss_fn, make_train_step

    model, classes, k = TinyNet(embedding_size=16), 6, 2
    params, bs, hs = init_variables(model, jax.random.PRNGKey(0), classes, image_size=16, embedding_size=16)
    state = create_train_state(params, bs, hs, optim.make_optimizer(optax.constant_schedule(0.1), params, bs),
                               jax.random.PRNGKey(1))
    batch = random_batch(2, 8, classes)
    batch["quality"] = np.array([1.0, 0.1, 1.0, 0.3, 0.9, 0.0, 1.0, 0.2], np.float32)
    kwargs = dict(head="adaface", head_kwargs=dict(m=0.4, h=0.333, s=64.0, t_alpha=0.01), num_classes=classes)
    _, metrics = jax.jit(make_train_step(model, StepConfig(**kwargs, accum_steps=k)))(state, batch)
    loss_fn = make_loss_fn(model, StepConfig(**kwargs))
    rng, batch_stats, head_state, losses = jax.random.fold_in(state.rng, state.step), state.batch_stats, hs, []
    for i in range(k):
        rows = np.arange(i, 8, k)
        loss, (batch_stats, head_state, _) = loss_fn(state.params, batch_stats, head_state, batch["image"][rows],
                                                     batch["label"][rows], jax.random.fold_in(rng, i),
                                                     batch["quality"][rows])
        losses.append(float(loss))
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    plain = {k_: v for k_, v in batch.items() if k_ != "quality"}
    _, without = jax.jit(make_train_step(model, StepConfig(**kwargs, accum_steps=k)))(state, plain)
    assert float(without["loss"]) != pytest.approx(float(metrics["loss"]), rel=1e-4)  # the scaler came from quality


# --- the gradient scale: analytic slopes against finite differences through the real heads --------------------

@pytest.mark.parametrize("head", ["adaface", "arcface", "cosface"])
def test_gradient_scale_and_third_shares_match_finite_differences_through_the_head(head):
    r = np.random.default_rng(1)
    b, m, s = 12, {"adaface": 0.4, "arcface": 0.5, "cosface": 0.4}[head], 64.0
    cos_y = r.uniform(-0.6, 0.95, b)
    cos_other = r.uniform(-0.3, 0.3, b) * np.sqrt(1 - cos_y ** 2)
    norms = r.uniform(5, 40, (b, 1)).astype(np.float32)
    kernel = np.eye(3, 2, dtype=np.float64)  # class 0 along x, class 1 along y
    labels = np.zeros(b, int)
    mean, std, h = 20.0, 6.0, 0.333
    state = heads.AdaFaceState(batch_mean=jnp.full((1,), mean), batch_std=jnp.full((1,), std))

    def per_sample_loss(cy):
        emb = np.stack([cy, cos_other, np.sqrt(1 - cy ** 2 - cos_other ** 2)], axis=1)
        kw = dict(m=m, s=s, t_alpha=0.0) if head == "adaface" else dict(m=m, s=s)
        st = state if head == "adaface" else None
        logits, _ = heads.HEADS[head](jnp.asarray(emb, jnp.float32), jnp.asarray(norms), jnp.asarray(labels),
                                      jnp.asarray(kernel, jnp.float32), st, **kw)
        z = np.asarray(logits, np.float64)
        return -(z[:, 0] - np.log(np.exp(z).sum(axis=1)))

    delta = 1e-3
    brute = -(per_sample_loss(cos_y + delta) - per_sample_loss(cos_y - delta)) / (2 * delta)  # -dL/dcos_y
    scaler = mechanism.scaler_from(norms[:, 0], mean, std, h) if head == "adaface" else None
    ours = mechanism.gradient_scale(np.stack([cos_y, cos_other], 1), labels, head, scaler, m, s)
    np.testing.assert_allclose(ours, brute, rtol=2e-2, atol=2e-2)
    quality = r.uniform(size=b)
    thirds = mechanism.quality_thirds(quality)
    assert np.bincount(thirds).tolist() == [4, 4, 4]
    assert np.all(quality[thirds == 0].max() < quality[thirds == 1].min())
    np.testing.assert_allclose(mechanism.third_shares(ours, thirds),
                               [brute[thirds == k].sum() / brute.sum() for k in range(3)], atol=5e-3)
