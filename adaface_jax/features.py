"""Batched, sharded embedding extraction with flip-test fusion (the ONE implementation).

Used by evaluation, training validation and inference. Images go in as NHWC **BGR**, either
uint8 in [0, 255] (normalised here to ``(x/255 - 0.5)/0.5``) or float already normalised to
[-1, 1]. Batches are padded to a multiple of the local device count, sharded over
``Mesh(jax.local_devices(), ('data',))`` with ``P('data')`` and run through one jitted function
that applies the model to the image and (optionally) its horizontal flip (NHWC axis 2, on the
normalised tensor) and fuses the two views with :func:`fuse` (the fusion helpers of the original's validate_IJB_BC.py and utils.py).
"""
from __future__ import annotations

import functools
import hashlib
import zipfile
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from adaface_jax import io
from adaface_jax.compile_options import DEFAULT_CPU_CONVOLUTIONS, compiler_options
from adaface_jax.io import save_npz
from data_pipeline.pixels import normalize_pixels
from evaluation import FUSION_METHODS


def _xp(x):
    """numpy for numpy inputs, jax.numpy for jax arrays and tracers."""
    if isinstance(x, np.ndarray):
        return np
    return jax.numpy if isinstance(x, jax.Array) else np


def _l2_normalize(xp, v):
    # Plain division, no epsilon: a zero vector gives NaN like the reference.
    return v / xp.linalg.norm(v, axis=-1, keepdims=True)


def fuse(embs, norms=None, method: str = "pre_norm_vector_add"):
    """Fuse K views: ``embs (K, N, D)`` unit vectors, ``norms (K, N, 1)`` -> ``(features, norms)``.

    * ``pre_norm_vector_add``: ``v = sum_k n_k e_k``; feature ``v/||v||``, norm ``||v||``.
    * ``norm_weighted_avg``: feature ``normalize(sum_k (n_k/sum_j n_j) e_k)``, norm ``mean_k n_k``.
    * ``average``: feature ``normalize(sum_k e_k)``, norm ``mean_k n_k`` (ones without norms).
    * ``concat``: feature ``[e_1, ..., e_K]`` (K*D, NOT normalised), norm ``mean_k n_k``.
    Works on numpy and jax arrays alike.
    """
    xp = _xp(embs)
    if embs.ndim != 3:
        raise ValueError(f"embs must be (K, N, D), got shape {tuple(embs.shape)}")
    if norms is None:
        if method != "average":
            raise ValueError(f"fusion {method!r} needs norms")
        return _l2_normalize(xp, xp.sum(embs, axis=0)), xp.ones((embs.shape[1], 1), embs.dtype)
    if norms.shape != embs.shape[:2] + (1,):
        raise ValueError(f"norms must be (K, N, 1) = {embs.shape[:2] + (1,)}, got {tuple(norms.shape)}")
    if method == "pre_norm_vector_add":
        v = xp.sum(embs * norms, axis=0)
        n = xp.linalg.norm(v, axis=-1, keepdims=True)
        return v / n, n
    if method == "norm_weighted_avg":
        w = norms / xp.sum(norms, axis=0, keepdims=True)
        return _l2_normalize(xp, xp.sum(embs * w, axis=0)), xp.mean(norms, axis=0)
    if method == "average":
        return _l2_normalize(xp, xp.sum(embs, axis=0)), xp.mean(norms, axis=0)
    if method == "concat":
        return xp.concatenate(list(embs), axis=-1), xp.mean(norms, axis=0)
    if method == "faceness_score":
        raise NotImplementedError("fusion 'faceness_score' is not implemented (as in the reference)")
    raise ValueError(f"unknown fusion method {method!r}; expected one of {FUSION_METHODS}")


def make_mesh():
    """1-D ``('data',)`` mesh over all local devices."""
    return jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))


def _batches(images, batch_size: int) -> Iterator[np.ndarray]:
    """Re-chunk an array or an iterable of arrays into batches of exactly ``batch_size`` (last shorter)."""
    if isinstance(images, np.ndarray) or hasattr(images, "__getitem__") and hasattr(images, "shape"):
        for start in range(0, images.shape[0], batch_size):
            yield np.asarray(images[start:start + batch_size])
        return
    pending, count = [], 0
    for chunk in images:
        chunk = np.asarray(chunk)
        if chunk.ndim == 3:
            chunk = chunk[None]
        pending.append(chunk)
        count += chunk.shape[0]
        while count >= batch_size:
            block = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield block[:batch_size]
            rest = block[batch_size:]
            pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
    if count:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


@functools.lru_cache(maxsize=16)
def _batch_embed_fn(module, flip_test: bool = True, fusion: str = "pre_norm_vector_add",
                    cpu_convolutions: str = DEFAULT_CPU_CONVOLUTIONS):
    """jit-compiled ``(variables, images) -> (features, norms)`` for one (sharded) batch.

    Cached per (module config, flip, fusion, CPU convolution kernels) so repeated validation runs compile
    once."""

    if fusion not in FUSION_METHODS:
        fuse(np.zeros((1, 1, 1)), np.ones((1, 1, 1)), fusion)  # raises the right error

    def embed(variables, images):
        x = normalize_pixels(images)
        if not flip_test:
            emb, norm = module.apply(variables, x, train=False)
            return emb.astype(jnp.float32), norm.astype(jnp.float32)
        both = jnp.concatenate([x, jnp.flip(x, axis=2)], axis=0)
        emb, norm = module.apply(variables, both, train=False)
        n = x.shape[0]
        embs = jnp.stack([emb[:n], emb[n:]]).astype(jnp.float32)
        norms = jnp.stack([norm[:n], norm[n:]]).astype(jnp.float32)
        return fuse(embs, norms, fusion)

    return jax.jit(embed, compiler_options=compiler_options(cpu_convolutions))


def _cache_path(cache_dir, cache_key, flip_test, fusion):
    """``<readable prefix>-<sha256 of the key>__flip<0|1>_<fusion>.npz``: the file name never
    truncates the key, and the full key is stored inside and compared on a hit."""
    key = str(cache_key)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key.split("|", 1)[0])[:64]
    digest = hashlib.sha256(f"{key}|flip={int(flip_test)}|fusion={fusion}".encode()).hexdigest()[:20]
    return io.join(cache_dir, f"{safe}-{digest}__flip{int(flip_test)}_{fusion}.npz")


def _cache_lookup(path, key_text):
    """Cached ``(features, norms)`` when ``path`` holds exactly this key; None otherwise (absent,
    unreadable, or another key: then the caller recomputes and overwrites)."""
    if not io.exists(path):
        return None
    try:
        with np.load(io.readable(path), allow_pickle=False) as z:
            if "cache_key" not in z.files or str(z["cache_key"]) != key_text:
                return None
            return z["features"], z["norms"]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):  # TypeError: a bare .npy
        return None


def extract_features(module, variables, images, batch_size: int = 128, flip_test: bool = True,
                     fusion: str = "pre_norm_vector_add", mesh=None, cache_dir: str | None = None,
                     cache_key: str | None = None, num_images: int | None = None,
                     progress: bool = True, desc: str = "embedding",
                     cpu_convolutions: str = DEFAULT_CPU_CONVOLUTIONS):
    """Embed ``images`` -> ``(features (N, D'), norms (N, 1))`` as float32 numpy arrays.

    Args:
      module, variables: a Flax module whose ``apply(variables, x, train=False)`` returns
        ``(emb (B, D) unit, norm (B, 1))`` and its variables.
      images: NHWC BGR, uint8 (normalised here) or float32 already in [-1, 1]; an array
        (N, H, W, 3) or an iterable of such arrays (any chunk sizes; re-batched here).
      batch_size: images per step; rounded up to a multiple of the local device count. The last
        batch is zero-padded to full size (one compiled shape) and the padding dropped.
      flip_test, fusion: the flip test and fusion method (see :func:`fuse`).
      mesh: a mesh with a ``'data'`` axis; default all local devices.
      cache_dir, cache_key: when both are given, results are read from / written atomically to (a local
        folder or ``gs://``)
        ``<cache_dir>/<key prefix>-<key hash>__flip<0|1>_<fusion>.npz``. The key must determine
        the features: the weights' content, the images' content and the compute settings (see
        ``adaface_jax.cli.evaluate``); it is stored in the file and compared on a hit, so a
        different key never returns these features. A hit does not run the model.
      num_images: total count for the progress bar when ``images`` is a plain iterable.
      cpu_convolutions: the convolution kernels on the CPU backend (``adaface_jax.compile_options``).
    """

    path = key_text = None
    if cache_dir is not None and cache_key is not None:
        path = _cache_path(cache_dir, cache_key, flip_test, fusion)
        key_text = f"{cache_key}|flip={int(flip_test)}|fusion={fusion}"
        hit = _cache_lookup(path, key_text)
        if hit is not None:
            return hit

    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh.shape["data"]
    batch_size = max(n_dev, -(-int(batch_size) // n_dev) * n_dev)
    sharding = NamedSharding(mesh, P("data"))
    embed = _batch_embed_fn(module, flip_test, fusion, cpu_convolutions)
    variables = jax.device_put(variables, NamedSharding(mesh, P()))

    total = num_images if num_images is not None else (images.shape[0] if hasattr(images, "shape") else None)
    bar = None
    if progress:
        bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)

    feats, norms, pending = [], [], None

    def collect(item):
        (f, n), valid = item
        feats.append(np.asarray(f)[:valid])
        norms.append(np.asarray(n)[:valid])
        if bar is not None:
            bar.update(valid)

    for batch in _batches(images, batch_size):
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"images must be NHWC with 3 (BGR) channels, got batch shape {batch.shape}")
        valid = batch.shape[0]
        if valid < batch_size:
            pad = np.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad])
        out = embed(variables, jax.device_put(batch, sharding))  # async dispatch
        if pending is not None:
            collect(pending)  # fetch the previous batch while this one runs
        pending = (out, valid)
    if pending is not None:
        collect(pending)
    if bar is not None:
        bar.close()
    if not feats:
        raise ValueError("no images to embed")
    features = np.concatenate(feats).astype(np.float32)
    norms_out = np.concatenate(norms).astype(np.float32)
    if path is not None:
        save_npz(path, features=features, norms=norms_out, cache_key=np.array(key_text))
    return features, norms_out


def make_embed_fn(module, variables, *, batch_size: int = 128, flip_test: bool = True,
                  fusion: str = "pre_norm_vector_add", mesh=None, cpu_convolutions: str = DEFAULT_CPU_CONVOLUTIONS):
    """``embed_fn(images) -> (features (N, D), norms (N, 1))`` of ``module`` with ``variables``, through
    :func:`extract_features`: what the evaluators are given (``evaluation.evaluators``).

    With several processes each process embeds its contiguous block of the images (padded to equal blocks
    with copies of the last image) on its own devices and the features are gathered
    (``multihost_utils.process_allgather``): every process gets all of them, for 1/P of the work. ``mesh``
    (default: the local devices) is used with one process; the variables must then be replicated."""
    nproc, pid = jax.process_count(), jax.process_index()
    if nproc > 1:
        # Replicated variables: each process embeds its share on its own devices from its local copy.
        variables = jax.tree_util.tree_map(
            lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x), variables)
        mesh = make_mesh()
    options = dict(batch_size=batch_size, flip_test=flip_test, fusion=fusion, mesh=mesh, progress=False,
                   cpu_convolutions=cpu_convolutions)

    def embed_fn(images):
        if nproc == 1:
            return extract_features(module, variables, images, **options)
        from jax.experimental import multihost_utils  # noqa: PLC0415

        n = len(images)
        per = -(-n // nproc)
        rows = np.minimum(np.arange(pid * per, (pid + 1) * per), n - 1)  # the last block padded with image n-1
        feats, norms = extract_features(module, variables, np.asarray(images)[rows], **options)
        gathered = multihost_utils.process_allgather({"f": feats, "n": norms})
        return (np.asarray(gathered["f"]).reshape(nproc * per, -1)[:n],
                np.asarray(gathered["n"]).reshape(nproc * per, -1)[:n])

    return embed_fn
