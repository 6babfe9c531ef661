"""adaface_jax.features: sharded extraction, padding, flip fusion, fusion math, cache."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaface_jax import features


class TinyNet(nn.Module):
    """Same (emb, norm) contract as IResNet; position dependent so the flip matters."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(16)(x)
        n = jnp.linalg.norm(x, axis=-1, keepdims=True)
        return x / n, n


@pytest.fixture(scope="module")
def tiny():
    module = TinyNet()
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
    return module, variables


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def _raw(module, variables, x_float):
    """Raw (unnormalised) 16-d output of the tiny model, computed in numpy."""
    k = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
    b = np.asarray(variables["params"]["Dense_0"]["bias"], np.float64)
    return x_float.reshape(len(x_float), -1).astype(np.float64) @ k + b


def test_eight_devices_present():
    assert len(jax.local_devices()) == 8


def test_flip_fusion_matches_hand_computation_and_padding(tiny):
    module, variables = tiny
    imgs = _images(13)  # 13 images, batch 8 -> second batch padded with 3 zeros
    f, n = features.extract_features(module, variables, imgs, batch_size=8, progress=False)
    x = (imgs.astype(np.float32) / 255.0 - 0.5) / 0.5
    v = _raw(module, variables, x) + _raw(module, variables, x[:, :, ::-1, :])  # flip width (axis 2)
    np.testing.assert_allclose(n[:, 0], np.linalg.norm(v, axis=1), rtol=2e-5)
    np.testing.assert_allclose(f, v / np.linalg.norm(v, axis=1, keepdims=True), atol=2e-6)
    assert f.shape == (13, 16) and n.shape == (13, 1) and f.dtype == np.float32
    # per-image (batch of one, padded to 8 devices) equals the padded-batch result
    for i in (0, 12):
        fi, ni = features.extract_features(module, variables, imgs[i:i + 1], batch_size=1, progress=False)
        np.testing.assert_allclose(fi[0], f[i], atol=1e-6)
        np.testing.assert_allclose(ni[0], n[i], rtol=1e-6)


def test_iterable_input_and_float_input(tiny):
    module, variables = tiny
    imgs = _images(11, seed=1)
    ref_f, ref_n = features.extract_features(module, variables, imgs, batch_size=16, progress=False)
    chunks = (imgs[i:i + 3] for i in range(0, 11, 3))
    f, n = features.extract_features(module, variables, chunks, batch_size=8, num_images=11, progress=False)
    np.testing.assert_allclose(f, ref_f, atol=1e-6)
    x = (imgs.astype(np.float32) / 255.0 - 0.5) / 0.5
    f2, _ = features.extract_features(module, variables, x, batch_size=8, progress=False)
    np.testing.assert_allclose(f2, ref_f, atol=1e-6)


def test_no_flip(tiny):
    module, variables = tiny
    imgs = _images(5, seed=2)
    f, n = features.extract_features(module, variables, imgs, batch_size=8, flip_test=False, progress=False)
    v = _raw(module, variables, (imgs.astype(np.float32) / 255.0 - 0.5) / 0.5)
    np.testing.assert_allclose(n[:, 0], np.linalg.norm(v, axis=1), rtol=2e-5)
    np.testing.assert_allclose(f, v / np.linalg.norm(v, axis=1, keepdims=True), atol=2e-6)


def test_fuse_methods_by_hand():
    e1, e2 = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    n1, n2 = np.array([[3.0]]), np.array([[4.0]])
    embs, norms = np.stack([e1, e2]), np.stack([n1, n2])
    f, n = features.fuse(embs, norms, "pre_norm_vector_add")
    np.testing.assert_allclose(f, [[0.6, 0.8]]); np.testing.assert_allclose(n, [[5.0]])
    f, n = features.fuse(embs, norms, "norm_weighted_avg")
    np.testing.assert_allclose(f, [[0.6, 0.8]]); np.testing.assert_allclose(n, [[3.5]])
    f, n = features.fuse(embs, norms, "average")
    np.testing.assert_allclose(f, [[2 ** -0.5, 2 ** -0.5]]); np.testing.assert_allclose(n, [[3.5]])
    f, n = features.fuse(embs, None, "average")
    np.testing.assert_allclose(n, [[1.0]])
    f, n = features.fuse(embs, norms, "concat")
    np.testing.assert_allclose(f, [[1.0, 0.0, 0.0, 1.0]]); np.testing.assert_allclose(n, [[3.5]])
    with pytest.raises(NotImplementedError):
        features.fuse(embs, norms, "faceness_score")
    with pytest.raises(ValueError, match="unknown fusion"):
        features.fuse(embs, norms, "nope")
    # jnp path gives the same numbers
    fj, nj = features.fuse(jnp.asarray(embs, jnp.float32), jnp.asarray(norms, jnp.float32), "norm_weighted_avg")
    np.testing.assert_allclose(np.asarray(fj), [[0.6, 0.8]], rtol=1e-6)
    # zero vector -> NaN (no epsilon), like the reference
    with np.errstate(invalid="ignore"):
        f, _ = features.fuse(np.zeros((2, 1, 2)), np.ones((2, 1, 1)), "average")
    assert np.isnan(f).all()


@pytest.mark.parametrize("fusion", ["norm_weighted_avg", "concat"])
def test_extract_other_fusions(tiny, fusion):
    module, variables = tiny
    imgs = _images(3, seed=4)
    f, n = features.extract_features(module, variables, imgs, batch_size=8, fusion=fusion, progress=False)
    x = (imgs.astype(np.float32) / 255.0 - 0.5) / 0.5
    r1, r2 = _raw(module, variables, x), _raw(module, variables, x[:, :, ::-1])
    n1, n2 = np.linalg.norm(r1, axis=1, keepdims=True), np.linalg.norm(r2, axis=1, keepdims=True)
    ref_f, ref_n = features.fuse(np.stack([r1 / n1, r2 / n2]), np.stack([n1, n2]), fusion)
    np.testing.assert_allclose(f, ref_f, atol=2e-6)
    np.testing.assert_allclose(n, ref_n, rtol=2e-5)


def test_cache_hit_does_not_recompute(tiny, tmp_path, monkeypatch):
    module, variables = tiny
    imgs = _images(6, seed=5)
    f, n = features.extract_features(module, variables, imgs, batch_size=8, progress=False,
                                     cache_dir=str(tmp_path), cache_key="tiny-step0-lfw")
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npz") and not files[0].startswith(".tmp")

    def boom(*a, **k):
        raise AssertionError("model ran on a cache hit")
    monkeypatch.setattr(features, "_batch_embed_fn", boom)
    f2, n2 = features.extract_features(module, variables, imgs, batch_size=8, progress=False,
                                       cache_dir=str(tmp_path), cache_key="tiny-step0-lfw")
    np.testing.assert_array_equal(f, f2)
    np.testing.assert_array_equal(n, n2)


def test_ir18_small_batch_runs_sharded():
    from adaface_jax.models import build_model
    model = build_model("ir_18")
    imgs = _images(3, seed=6)
    imgs = np.repeat(np.repeat(imgs, 14, axis=1), 14, axis=2)  # 112x112
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)), train=False)
    f, n = features.extract_features(model, variables, imgs, batch_size=2, flip_test=True, progress=False)
    x = (imgs.astype(np.float32) / 255.0 - 0.5) / 0.5
    e1, n1 = model.apply(variables, x, train=False)
    e2, n2 = model.apply(variables, x[:, :, ::-1], train=False)
    v = np.asarray(e1) * np.asarray(n1) + np.asarray(e2) * np.asarray(n2)
    np.testing.assert_allclose(f, v / np.linalg.norm(v, axis=1, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(n[:, 0], np.linalg.norm(v, axis=1), rtol=1e-4)
