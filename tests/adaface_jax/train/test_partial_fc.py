"""Partial FC on the class-sharded kernel (8 simulated devices): r=1 is today's step bit for bit; r<1
against a dense reference of the same sampled step (indices re-derived in numpy from the same draws)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adaface_jax import heads, parallel
from adaface_jax.train import partial_fc
from adaface_jax.train.config import check_config
from adaface_jax.train.loop import ConfigError
from adaface_jax.train.setup import build_trainer
from tests.support.train_fixtures import random_batch, tiny_config

NDEV = 8


def _trainer(num_classes, sample_rate=None, head="adaface", devices=None):
    c = tiny_config(num_classes)
    if sample_rate is not None:
        c.head.sample_rate = sample_rate
    if head != "adaface":
        c.head.name = head
        c.head.m = 0.5 if head == "arcface" else 0.4
    mesh = parallel.make_mesh(devices or jax.devices())
    return build_trainer(c, mesh, steps_per_epoch=2), c


def _leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rate_one_is_the_full_softmax_step_bit_for_bit():
    """sample_rate=1.0 (the default) against a config without the field (an older recipe, filled by
    check_config) and against the step built from a StepConfig without Partial FC settings: identical bits
    after 2 steps."""
    from adaface_jax.train.step import StepConfig, make_train_step  # noqa: PLC0415

    t1, _ = _trainer(40, sample_rate=1.0)
    t0, c0 = _trainer(40)
    del c0.head["sample_rate"]
    t_old = build_trainer(check_config(c0, num_devices=t0.mesh.devices.size, process_count=1), t0.mesh,
                          steps_per_epoch=2)
    cfg = StepConfig(head=c0.head, num_classes=40, lr_fn=t_old.schedule,
                     embedding_sharding=parallel.embedding_sharding(t0.mesh),
                     logits_sharding=parallel.logits_sharding(t0.mesh))
    old_step = parallel.jit_sharded(make_train_step(t_old.model, cfg), t0.mesh, t_old.shardings)
    s1, s_old = t1.state, t_old.state
    for i in range(2):
        b = parallel.host_to_global(random_batch(i, 16, 40), t0.mesh)
        s1, m1 = t1.step(s1, b)
        s_old, m_old = old_step(s_old, b)
        assert float(m1["loss"]) == float(m_old["loss"])
    _leaves_equal(s1.checkpoint_items(), s_old.checkpoint_items())


def test_sampling_every_class_equals_the_full_softmax():
    """r just below 1 with 5 columns per device samples every column (k = ceil(0.99*5) = 5) but runs the
    shard_map head with its distributed softmax: same loss and update as the full step up to float32."""
    t_full, _ = _trainer(40)
    t_pfc, _ = _trainer(40, sample_rate=0.99)
    assert partial_fc.num_sampled(40, NDEV, 0.99, 16) == 5
    b = parallel.host_to_global(random_batch(0, 16, 40), t_full.mesh)
    sf, mf = t_full.step(t_full.state, b)
    sp, mp = t_pfc.step(t_pfc.state, b)
    np.testing.assert_allclose(float(mp["loss"]), float(mf["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(sp.params), jax.tree_util.tree_leaves(sf.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def _reference_indices(rng, step, labels, num_classes, padded, k):
    """Numpy re-derivation of the sampled global columns from the documented draws:
    scores_d = uniform(fold_in(fold_in(fold_in(rng, step), TAG), d)); positives 2, padding -1, top k."""
    cl = padded // NDEV
    key = jax.random.fold_in(jax.random.fold_in(rng, step), partial_fc.SAMPLE_TAG)
    chosen = []
    for d in range(NDEV):
        scores = np.asarray(jax.random.uniform(jax.random.fold_in(key, d), (cl,))).astype(np.float64)
        cols = d * cl + np.arange(cl)
        scores[cols >= num_classes] = -1.0
        scores[np.isin(cols, labels)] = 2.0
        top = np.argsort(-scores, kind="stable")[:k]
        chosen.extend(cols[top][cols[top] < num_classes])
    return np.sort(np.asarray(chosen))


@pytest.mark.parametrize("head", ["adaface", "arcface"])
def test_sampled_step_matches_dense_reference(head):
    num_classes, r, batch = 500, 0.25, 8         # padded to 504: 63 columns per device, 59 real on the last
    t, c = _trainer(num_classes, sample_rate=r, head=head)
    padded = t.padded_classes
    k = partial_fc.num_sampled(padded, NDEV, r, batch)
    assert (padded, k) == (504, 16)
    state0 = t.state
    host0 = jax.device_get(state0.checkpoint_items())
    data = random_batch(7, batch, num_classes)
    data["label"][:3] = [0, 1, 499]                  # two positives in shard 0, one in the last real column
    state1, metrics = t.step(state0, parallel.host_to_global(data, t.mesh))

    labels = data["label"]
    sampled = _reference_indices(host0["rng"], 0, labels, num_classes, padded, k)
    assert set(labels) <= set(sampled)                                # every positive is kept
    assert sampled.max() < num_classes                                # padding never sampled
    assert len(sampled) == NDEV * k - (k - 59 if 59 < k else 0)
    pos = np.searchsorted(sampled, labels)

    # Dense formulation of the same sampled step: softmax over kernel[:, sampled] only, jax.grad on one device,
    # in float64. The sharded float32 step is bounded by its distance to it: two float32 programs (8 devices vs
    # one) round differently on different CPUs, e.g. the near-zero updates of biases whose true gradient is 0.
    head_fn = heads.HEADS[head]
    kwargs = heads.head_params(c.head)
    dropout_rng = jax.random.fold_in(host0["rng"], 0)
    with jax.enable_x64(True):
        to64 = lambda tree: jax.tree_util.tree_map(  # noqa: E731
            lambda a: jnp.asarray(a, jnp.float64) if np.issubdtype(np.asarray(a).dtype, np.floating)
            else jnp.asarray(a), tree)
        params, batch_stats, head_state = to64(host0["params"]), to64(host0["batch_stats"]), to64(host0["head_state"])

        def dense_loss(p):
            (emb, norm), _ = t.model.apply({"params": p["backbone"], "batch_stats": batch_stats},
                                           jnp.asarray(data["image"], jnp.float64), train=True,
                                           mutable=["batch_stats"], rngs={"dropout": dropout_rng})
            w = p["head"]["kernel"][:, sampled]
            logits, hs = head_fn(emb, norm, jnp.asarray(pos), w, head_state, **kwargs)
            return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(batch), pos]), hs

        (loss, hs), grads = jax.value_and_grad(dense_loss, has_aux=True)(params)
        assert grads["head"]["kernel"].dtype == jnp.float64
        # the whole kernel goes through the optimizer: first step, momentum 0 -> unsampled columns only decay
        updates, _ = state0.tx.update(grads, to64(host0["opt_state"]), params)
        want = jax.device_get(optax.apply_updates(params, updates))
        g_kernel, loss, hs = np.asarray(grads["head"]["kernel"]), float(loss), jax.device_get(hs)
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    unsampled = np.setdiff1d(np.arange(padded), sampled)
    assert np.all(g_kernel[:, unsampled] == 0) and np.abs(g_kernel[:, sampled]).max() > 0
    got = jax.device_get(state1.params)
    k1 = np.asarray(got["head"]["kernel"])
    np.testing.assert_allclose(k1[:, unsampled], host0["params"]["head"]["kernel"][:, unsampled] * (1 - 0.1 * 5e-4),
                               rtol=1e-6)
    # Measured against float64 (2026-12-02, AMD EPYC, with and without --xla_cpu_max_isa=AVX2): worst 8e-7 to 1.7e-6
    # absolute, on biases with a zero true gradient; a wrong sampled column or gradient is off by ~1e-3.
    worst = max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y)).max())
                for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)))
    print(f"\n[{head}] worst parameter error of the sharded step against float64: {worst:.2e}")
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y), rtol=1e-5, atol=1e-5)
    if head == "adaface":  # norm statistics do not depend on sampling
        np.testing.assert_allclose(np.asarray(state1.head_state.batch_mean), np.asarray(hs.batch_mean), rtol=1e-5)


def test_sampling_is_deterministic_per_step_and_changes_across_steps():
    """Two runs from the same seed draw the same classes (same states bit for bit); a different step
    draws different negatives."""
    num_classes = 500
    runs = []
    for _ in range(2):
        t, _ = _trainer(num_classes, sample_rate=0.2, head="cosface")
        s = t.state
        for i in range(2):
            s, _ = t.step(s, parallel.host_to_global(random_batch(i, 8, num_classes), t.mesh))
        runs.append(jax.device_get(s.checkpoint_items()))
    _leaves_equal(runs[0], runs[1])
    rng = runs[0]["rng"]
    a = _reference_indices(rng, 0, np.array([0]), num_classes, 504, 16)
    b = _reference_indices(rng, 1, np.array([0]), num_classes, 504, 16)
    assert set(a) != set(b)


def test_bad_sample_rate_is_a_config_error():
    c = tiny_config(40)
    c.head.sample_rate = 0.0
    with pytest.raises(ConfigError, match=r"config.head.sample_rate=0.0: expected 0 < sample_rate <= 1"):
        check_config(c, num_devices=8, process_count=1)



def test_selection_keeps_positives_and_masks_padding_of_a_short_shard():
    """Hand-worked shard of classes 10..15, k = 4."""
    scores = jnp.asarray([0.9, 0.1, 0.5, 0.7, 0.3, 0.8], jnp.float32)
    # num_classes=14: 10..13 real, 14/15 padding (score -1); 13 is a positive (score 2) although 0.7 < 0.8
    idx, valid = partial_fc.select_local(scores, jnp.asarray([13, 3]), 10, 14, 4)
    assert list(np.asarray(idx)) == [0, 1, 2, 3] and list(np.asarray(valid)) == [True] * 4
    # num_classes=12: only 10, 11 real; the two other slots are padding columns, flagged invalid (masked)
    idx, valid = partial_fc.select_local(scores, jnp.asarray([11, 3]), 10, 12, 4)
    assert list(np.asarray(idx)) == [0, 1, 2, 3] and list(np.asarray(valid)) == [True, True, False, False]
    # without positives the top-k of the scores: 10 (0.9), 15 (0.8), 13 (0.7), 12 (0.5)
    idx, _ = partial_fc.select_local(scores, jnp.asarray([3]), 10, 16, 4)
    assert list(np.asarray(idx)) == [0, 2, 3, 5]
    targets = partial_fc.local_targets(jnp.asarray([0, 2, 3]), jnp.asarray([12, 11, 13, 5]), 10)
    assert list(np.asarray(targets)) == [1, -1, 2, -1]
