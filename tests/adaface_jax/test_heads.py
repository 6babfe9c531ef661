"""Margin heads (adaface_jax.heads) vs the PyTorch reference heads written from head.py `AdaFace`.

Logits, cross-entropy, gradients w.r.t. embeddings and kernel, and AdaFace's running statistics over
5 consecutive steps.  Inputs include cosines at/near +-1 and norms outside [0.001, 100].
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from adaface_jax import heads
from tests.support.torch_reference import AdaFace, ArcFace, CosFace

RTOL = 1e-5
E, C, B = 32, 12, 8
TORCH_HEADS = {"adaface": AdaFace, "arcface": ArcFace, "cosface": CosFace}


def close(name, ours, ref, rel=RTOL):
    """allclose with rtol=rel and atol=rel*max|ref|: relative on large entries, and on near-zero ones
    relative to the array's scale (float32 rounding of s*cos near acos' singularity is ~1e-5 absolute
    on logits of size 64, whatever the implementation)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    peak = np.max(np.abs(ref))
    err = np.abs(ours - ref)
    worst = float(np.max(err / (np.abs(ref) + peak)))
    big = np.abs(ref) >= 1e-2 * peak
    rel_big = float(np.max(err[big] / np.abs(ref[big]))) if big.any() else 0.0
    print(f"  {name}: max abs diff {np.max(err):.3g} (scale {peak:.3g}), max rel diff {rel_big:.3g} "
          f"on entries >= 1% of scale")
    assert np.all(np.isfinite(ours)) and worst <= rel, (name, worst)
    return worst


def make_batch(rng, kernel, step):
    """Embeddings with a few adversarial rows: cos exactly +-1, cos just inside/outside the clamp."""
    labels = rng.randint(0, C, B)
    emb = rng.randn(B, E)
    k_hat = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    emb[0] = k_hat[:, labels[0]]                      # cos = 1 on the target (clamped)
    emb[1] = -k_hat[:, (labels[1] + 1) % C]           # cos = -1 on a non-target (clamped)
    ortho = rng.randn(E)
    ortho -= ortho @ k_hat[:, labels[2]] * k_hat[:, labels[2]]
    ortho /= np.linalg.norm(ortho)
    for row, c in ((2, 0.9985), (3, -0.99995)):  # near the AdaFace clamp / inside ArcFace's
        emb[row] = c * k_hat[:, labels[2]] + np.sqrt(1 - c * c) * ortho
        labels[row] = labels[2]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    norms = rng.uniform(5, 60, (B, 1))
    norms[0], norms[1], norms[2] = 1e-4, 250.0, 0.0005 + step  # outside [0.001, 100]
    return emb.astype(np.float32), norms.astype(np.float32), labels


def torch_step(head, emb, norms, labels):
    e = torch.tensor(emb, requires_grad=True)
    logits = head(e, torch.tensor(norms), torch.tensor(labels, dtype=torch.long))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels, dtype=torch.long))
    head.kernel.grad = None
    loss.backward()
    return logits.detach().numpy(), float(loss.detach()), e.grad.numpy(), head.kernel.grad.numpy().copy()


def jax_step(name, kernel, state, emb, norms, labels, **kw):
    fn = functools.partial(heads.HEADS[name], **kw)

    def loss_fn(e, k):
        logits, new_state = fn(e, jnp.asarray(norms), jnp.asarray(labels), k, state)
        return heads.softmax_cross_entropy(logits, jnp.asarray(labels)), (logits, new_state)

    (loss, (logits, new_state)), (g_e, g_k) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        jnp.asarray(emb), jnp.asarray(kernel))
    return np.asarray(logits), float(loss), np.asarray(g_e), np.asarray(g_k), new_state


@pytest.mark.parametrize("name", ["adaface", "arcface", "cosface"])
def test_head_matches_reference_over_five_steps(name):
    torch.manual_seed(0)
    ref = TORCH_HEADS[name](embedding_size=E, classnum=C)
    kernel = ref.kernel.detach().numpy().copy()
    state = heads.initial_state(name)
    rng = np.random.RandomState(1)
    print(f"\n[{name}]")
    for step in range(5):
        emb, norms, labels = make_batch(rng, kernel, step)
        t_logits, t_loss, t_ge, t_gk = torch_step(ref, emb, norms, labels)
        logits, loss, g_e, g_k, state = jax_step(name, kernel, state, emb, norms, labels)
        close(f"step {step} logits", logits, t_logits)
        close(f"step {step} loss", loss, t_loss)
        close(f"step {step} d loss/d emb", g_e, t_ge)
        close(f"step {step} d loss/d kernel", g_k, t_gk)
    if name == "adaface":
        close("batch_mean after 5 steps", state.batch_mean, ref.batch_mean.numpy())
        close("batch_std after 5 steps", state.batch_std, ref.batch_std.numpy())
        assert state.batch_mean.shape == (1,) and state.batch_std.shape == (1,)
        assert abs(float(state.batch_mean[0]) - 20.0) > 0.1  # the EMA really moved


def test_adaface_first_step_matches_spec_example():
    """head.py `AdaFace` (checked on the original): from (20, 100) one step with a batch of std 0.517 gives 99.005."""
    norms = np.array([[22.0], [22.0 + 0.517 * np.sqrt(2)]], np.float32)
    mu, sd = norms.mean(), norms.std(ddof=1)
    state = heads.AdaFaceState.create()
    emb = np.eye(2, E, dtype=np.float32)
    _, new = heads.adaface_logits(emb, norms, np.array([0, 1]), heads.init_kernel(jax.random.PRNGKey(0), E, C),
                                  state)
    np.testing.assert_allclose(float(new.batch_mean[0]), 0.01 * mu + 0.99 * 20, rtol=1e-6)
    np.testing.assert_allclose(float(new.batch_std[0]), 0.01 * sd + 0.99 * 100, rtol=1e-6)
    np.testing.assert_allclose(float(new.batch_std[0]), 99.00517, rtol=1e-6)


def test_batch_of_one_does_not_poison_state():
    torch.manual_seed(0)
    ref = AdaFace(embedding_size=E, classnum=C)
    kernel = ref.kernel.detach().numpy().copy()
    rng = np.random.RandomState(2)
    emb, norms, labels = make_batch(rng, kernel, 0)
    emb, norms, labels = emb[4:5], norms[4:5], labels[4:5]
    with torch.no_grad():
        t_logits = ref(torch.tensor(emb), torch.tensor(norms), torch.tensor(labels, dtype=torch.long)).numpy()
    assert np.isnan(ref.batch_std.numpy()).all() and np.isnan(t_logits).any()  # the original's behaviour
    logits, state = heads.adaface_logits(emb, norms, labels, kernel, heads.AdaFaceState.create())
    assert np.all(np.isfinite(np.asarray(logits)))
    np.testing.assert_allclose(np.asarray(state.batch_std), [100.0])
    np.testing.assert_allclose(np.asarray(state.batch_mean), [0.01 * norms[0, 0] + 0.99 * 20.0], rtol=1e-6)
    # and the opt-out reproduces the original's NaN
    _, nan_state = heads.adaface_logits(emb, norms, labels, kernel, heads.AdaFaceState.create(),
                                        skip_std_update_below_two=False)
    assert np.isnan(np.asarray(nan_state.batch_std)).all()


def test_num_groups_reproduces_per_device_statistics():
    """num_groups=k: group g's rows equal a fresh reference head fed only group g (one 'GPU'), all
    starting from the same buffers; the returned state is group 0's (DDP broadcasts rank 0's)."""
    torch.manual_seed(0)
    base = AdaFace(embedding_size=E, classnum=C)
    with torch.no_grad():
        base.batch_mean.fill_(25.0)
        base.batch_std.fill_(8.0)
    kernel = base.kernel.detach().numpy().copy()
    rng = np.random.RandomState(3)
    emb, norms, labels = make_batch(rng, kernel, 1)
    k = 4
    ours, state = heads.adaface_logits(emb, norms, labels, kernel, heads.AdaFaceState.create(25.0, 8.0),
                                       num_groups=k)
    global_logits, _ = heads.adaface_logits(emb, norms, labels, kernel, heads.AdaFaceState.create(25.0, 8.0))
    print("\n[adaface num_groups=4]")
    per = B // k
    for g in range(k):
        ref = AdaFace(embedding_size=E, classnum=C)
        ref.load_state_dict(base.state_dict())
        sl = slice(g * per, (g + 1) * per)
        with torch.no_grad():
            t = ref(torch.tensor(emb[sl]), torch.tensor(norms[sl]), torch.tensor(labels[sl], dtype=torch.long))
        close(f"group {g} logits", np.asarray(ours)[sl], t.numpy())
        if g == 0:
            close("state (group 0)", np.concatenate([state.batch_mean, state.batch_std]),
                  np.concatenate([ref.batch_mean.numpy(), ref.batch_std.numpy()]))
    assert not np.allclose(np.asarray(global_logits), np.asarray(ours))  # grouping really changes margins


def test_axis_name_inside_shard_map_equals_global_batch():
    """Statistics reduced over a named axis across 4 devices = statistics of the whole batch."""
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py sets 8 CPU devices)")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    torch.manual_seed(0)
    ref = AdaFace(embedding_size=E, classnum=C)
    kernel = ref.kernel.detach().numpy().copy()
    emb, norms, labels = make_batch(np.random.RandomState(4), kernel, 2)
    with torch.no_grad():
        t = ref(torch.tensor(emb), torch.tensor(norms), torch.tensor(labels, dtype=torch.long)).numpy()

    def local(e, n, l, k, mean, std):
        logits, st = heads.adaface_logits(e, n, l, k, heads.AdaFaceState(mean, std), axis_name="data")
        return logits, st.batch_mean, st.batch_std

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P("data"), P(), P(), P()),
                       out_specs=(P("data"), P(), P()), check_vma=False)
    st0 = heads.AdaFaceState.create()
    logits, mean, std = jax.jit(fn)(emb, norms, labels, kernel, st0.batch_mean, st0.batch_std)
    print("\n[adaface shard_map axis_name]")
    close("logits", logits, t)
    close("state", np.concatenate([mean, std]), np.concatenate([ref.batch_mean.numpy(), ref.batch_std.numpy()]))


def test_init_kernel_matches_reference_recipe():
    k = np.asarray(heads.init_kernel(jax.random.PRNGKey(0), 512, 300))
    ref = AdaFace(embedding_size=512, classnum=300).kernel.detach().numpy()
    for arr in (k, ref):
        np.testing.assert_allclose(np.linalg.norm(arr, axis=0), 1.0, atol=1e-5)
    # uniform(-1, 1) then unit columns: entries ~ U(-1,1)/sqrt(512/3); compare moments with the reference
    np.testing.assert_allclose(np.std(k), np.std(ref), rtol=0.02)
    np.testing.assert_allclose(np.max(np.abs(k)), np.max(np.abs(ref)), rtol=0.1)
    assert abs(np.mean(k)) < 3e-3


def make_clip_batch(rng, kernel, step):
    """A batch that drives AdaFace's target angle out of [eps, pi - eps]: target cosines at/near +-1 paired
    with norms far above / below the running mean, so that with a small batch_std the scaler saturates at
    +-1 and theta - m*scaler leaves the interval (theta ~ 0.045 - 0.4 < eps, or pi - 0.045 + 0.4 > pi - eps)."""
    labels = rng.randint(0, C, B)
    k_hat = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    emb = rng.randn(B, E)
    ortho = rng.randn(E)
    for row, c in enumerate((1.0, 0.999, 0.97, -1.0, -0.9995, -0.98)):  # 6 rows with target cos near +-1
        t = k_hat[:, labels[row]]
        o = ortho - ortho @ t * t
        o /= np.linalg.norm(o)
        emb[row] = c * t + np.sqrt(max(0.0, 1 - c * c)) * o
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # high norms (scaler -> +1) on the cos ~ +1 rows, low norms (scaler -> -1) on the cos ~ -1 rows
    norms = np.array([95.0, 80.0 + step, 60.0, 1.0, 3.0 + step, 5.0, 24.0, 27.0])[:, None]
    return emb.astype(np.float32), norms.astype(np.float32), labels


def test_adaface_angle_clip_is_active_and_matches_reference():
    """The target-angle clip to [eps, pi - eps] (head.py `AdaFace`, `theta_m`) with the scaler saturated at +-1:
    batch_std 2 (AdaFaceState(25, 2)) and norms 1..95.  Logits, loss, gradients and state vs the reference
    over 3 steps; the unclipped angle is checked to really leave the interval on several rows each step."""
    torch.manual_seed(0)
    ref = AdaFace(embedding_size=E, classnum=C)
    with torch.no_grad():
        ref.batch_mean.fill_(25.0)
        ref.batch_std.fill_(2.0)
    kernel = ref.kernel.detach().numpy().copy()
    state = heads.AdaFaceState.create(25.0, 2.0)
    rng = np.random.RandomState(7)
    eps, m, h = 1e-3, 0.4, 0.333
    print("\n[adaface clip]")
    for step in range(3):
        emb, norms, labels = make_clip_batch(rng, kernel, step)
        # what the clip acts on, computed in float64 from the reference's state after its EMA update
        n = np.clip(norms[:, 0].astype(np.float64), 0.001, 100)
        mean = 0.01 * n.mean() + 0.99 * float(ref.batch_mean[0])
        std = 0.01 * n.std(ddof=1) + 0.99 * float(ref.batch_std[0])
        scaler = np.clip((n - mean) / (std + eps) * h, -1, 1)
        k_hat = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
        cos_t = np.clip(np.sum(emb * k_hat[:, labels].T, axis=1), -1 + eps, 1 - eps)
        raw = np.arccos(cos_t) - m * scaler
        low, high = int(np.sum(raw < eps)), int(np.sum(raw > np.pi - eps))
        print(f"  step {step}: scaler {np.round(scaler, 3)}; {low} angles < eps, {high} > pi - eps")
        assert low >= 2 and high >= 2 and np.sum(np.abs(scaler) == 1.0) >= 4
        t_logits, t_loss, t_ge, t_gk = torch_step(ref, emb, norms, labels)
        logits, loss, g_e, g_k, state = jax_step("adaface", kernel, state, emb, norms, labels)
        close(f"step {step} logits", logits, t_logits)
        close(f"step {step} loss", loss, t_loss)
        close(f"step {step} d loss/d emb", g_e, t_ge)
        close(f"step {step} d loss/d kernel", g_k, t_gk)
        close(f"step {step} state", np.concatenate([state.batch_mean, state.batch_std]),
              np.concatenate([ref.batch_mean.numpy(), ref.batch_std.numpy()]))
