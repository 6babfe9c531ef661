"""Margin heads as pure functions: AdaFace, ArcFace, CosFace.

Every head maps ``(embeddings, norms, labels, kernel, state) -> (scaled logits, new state)``:

* ``embeddings``: (B, E) unit vectors from the backbone; ``norms``: (B, 1) their pre-normalisation
  norms (only AdaFace uses them, never differentiated).
* ``kernel``: (E, C) class centres, normalised per column here (the original's ``l2_norm(kernel, 0)``).
* ``state``: AdaFace's running feature-norm statistics (``AdaFaceState``); ArcFace and CosFace carry
  an empty state so every head has one signature.

The target logit is selected with a one-hot mask rather than a gather, so the same code runs
unchanged when the kernel -- and hence the logits -- are sharded by class across devices.

Math follows AdaFace's head.py (``AdaFace``, ``ArcFace``, ``CosFace``); where we differ
it is an option, documented on the function.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class AdaFaceState:
    """Running statistics of the (clipped) feature norms; shapes (1,) as the PyTorch buffers."""

    batch_mean: jax.Array
    batch_std: jax.Array

    @classmethod
    def create(cls, mean: float = 20.0, std: float = 100.0) -> "AdaFaceState":
        return cls(jnp.full((1,), mean, jnp.float32), jnp.full((1,), std, jnp.float32))

    @classmethod
    def unseeded(cls) -> "AdaFaceState":
        """Statistics to be seeded from the first batch: NaN marks them unset, and ``adaface_logits`` then
        takes the first batch's mean and std as they are instead of blending them into 20 and 100 (which
        ``t_alpha = 0.01`` forgets only after some 500 steps)."""
        return cls.create(float("nan"), float("nan"))


@flax.struct.dataclass
class EmptyState:
    """ArcFace and CosFace keep no statistics."""


def init_kernel(rng: jax.Array, embedding_size: int, num_classes: int, dtype=jnp.float32) -> jax.Array:
    """``uniform(-1, 1)`` then every column scaled to unit L2 norm (the original's renorm trick)."""
    k = jax.random.uniform(rng, (embedding_size, num_classes), dtype, -1.0, 1.0)
    return k / jnp.linalg.norm(k, axis=0, keepdims=True)


def cosine_logits(embeddings: jax.Array, kernel: jax.Array, eps: float) -> jax.Array:
    """``clamp(e @ (W / ||W||_col), -1+eps, 1-eps)`` in float32."""
    e = embeddings.astype(jnp.float32)
    w = kernel.astype(jnp.float32)
    w = w / jnp.sqrt(jnp.sum(jnp.square(w), axis=0, keepdims=True))
    cos = jnp.matmul(e, w, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(cos, -1.0 + eps, 1.0 - eps)


def _target_mask(labels: jax.Array, num_classes: int) -> jax.Array:
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _group_stats(x: jax.Array, num_groups: int, axis_name: Optional[str]):
    """Mean and unbiased std of x (B,) per contiguous group -> (G, 1) each, plus counts."""
    b = x.shape[0]
    if b % num_groups:
        raise ValueError(f"AdaFace statistics: batch of {b} does not split into {num_groups} groups")
    xg = x.reshape(num_groups, b // num_groups)
    n = jnp.asarray(b // num_groups, jnp.float32)
    mean = jnp.mean(xg, axis=1, keepdims=True)
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
        n = n * jax.lax.psum(1, axis_name)
    ssd = jnp.sum(jnp.square(xg - mean), axis=1, keepdims=True)
    if axis_name is not None:
        ssd = jax.lax.psum(ssd, axis_name)
    std = jnp.sqrt(ssd / (n - 1.0))  # unbiased, as torch.Tensor.std
    return mean, std, n


def margin_scaler(norms, batch_mean, batch_std, h: float = 0.333, eps: float = 1e-3):
    """AdaFace's margin scaler ``clip(h (||z|| - mean) / (std + eps), -1, 1)`` (paper Eq. 6; head.py):
    -1 for the lowest-norm (lowest-quality) samples, +1 for the highest."""
    return jnp.clip((norms - batch_mean) / (batch_std + eps) * h, -1.0, 1.0)


def adaface_logits(embeddings, norms, labels, kernel, state: AdaFaceState, *, m: float = 0.4, h: float = 0.333,
                   s: float = 64.0, t_alpha: float = 0.01, eps: float = 1e-3, num_groups: int = 1,
                   axis_name: Optional[str] = None, skip_std_update_below_two: bool = True,
                   quality: Optional[jax.Array] = None):
    """AdaFace logits and the updated norm statistics.

    Defaults are the released recipe (m=0.4, h=0.333, s=64, t_alpha=0.01); eps=1e-3 is used in the
    three places of the original (cosine clamp, theta clip, std denominator).  The EMA is updated
    *before* the margin is computed, with the unbiased std of the clipped norms.

    Differences from the original, each an option:
      num_groups: 1 (default) takes the statistics over the whole batch -- the global batch when
        the batch is sharded over devices under ``jit``.  ``num_groups=k`` splits the batch into k
        contiguous groups (device shards); group g's margins use the EMA updated with group g's
        statistics and the returned state is group 0's, which is what the original computes under
        DDP (per-GPU statistics, buffers broadcast from rank 0).
      axis_name: inside ``shard_map``/``pmap``, reduce the statistics over this named axis.
      skip_std_update_below_two: a batch (group) of one sample has no unbiased std; the original
        writes NaN into ``batch_std`` and every later logit is NaN.  By default the std EMA is left
        unchanged for such a batch (the mean is still updated).  ``False`` reproduces the NaN.
      state from ``AdaFaceState.unseeded()`` (NaN): the first batch's statistics replace it whole; later
        batches blend in with ``t_alpha`` as usual.
      quality: an "oracle" positive control, not in the original: (B,) or (B, 1) true image qualities
        (higher = better).  The margin scaler then takes them, standardised over the batch (group), in
        place of the feature norms: ``clip(h (q - mean(q)) / (std(q) + eps), -1, 1)``.  The norm
        statistics are still updated from the norms.
    """
    cos = cosine_logits(embeddings, kernel, eps)
    b = cos.shape[0]
    safe_norms = jax.lax.stop_gradient(jnp.clip(norms.astype(jnp.float32).reshape(b), 0.001, 100.0))

    mean, std, n = _group_stats(safe_norms, num_groups, axis_name)
    if skip_std_update_below_two:
        std = jnp.where(n < 2, state.batch_std, std)
    new_mean = t_alpha * mean + (1.0 - t_alpha) * state.batch_mean  # (G, 1)
    new_std = t_alpha * std + (1.0 - t_alpha) * state.batch_std
    unseeded = jnp.isnan(state.batch_mean)
    new_mean = jnp.where(unseeded, mean, new_mean)
    new_std = jnp.where(unseeded, std, new_std)

    def per_sample(x):  # (G, 1) -> (B, 1): each group's value on its rows
        return jnp.repeat(x, b // num_groups, axis=0).reshape(b, 1)

    if quality is None:
        scaler = margin_scaler(safe_norms.reshape(b, 1), per_sample(new_mean), per_sample(new_std), h, eps)
    else:
        q = jax.lax.stop_gradient(jnp.asarray(quality, jnp.float32).reshape(b))
        q_mean, q_std, _ = _group_stats(q, num_groups, axis_name)
        scaler = margin_scaler(q.reshape(b, 1), per_sample(q_mean), per_sample(q_std), h, eps)

    onehot = _target_mask(labels, cos.shape[1])
    theta = jnp.arccos(cos)
    theta = jnp.clip(theta + onehot * (-m * scaler), eps, math.pi - eps)  # g_angular on the target
    cos = jnp.cos(theta) - onehot * (m + m * scaler)                       # g_additive on the target
    new_state = AdaFaceState(batch_mean=new_mean[0], batch_std=new_std[0])
    return s * cos, new_state


def arcface_logits(embeddings, norms, labels, kernel, state=None, *, m: float = 0.5, s: float = 64.0,
                   eps: float = 1e-4):
    """ArcFace (additive angular margin) as in AdaFace's head.py; ``norms`` unused."""
    cos = cosine_logits(embeddings, kernel, eps)
    onehot = _target_mask(labels, cos.shape[1])
    theta = jnp.clip(jnp.arccos(cos) + onehot * m, eps, math.pi - eps)
    return s * jnp.cos(theta), (state if state is not None else EmptyState())


def cosface_logits(embeddings, norms, labels, kernel, state=None, *, m: float = 0.4, s: float = 64.0,
                   eps: float = 1e-4):
    """CosFace (additive cosine margin) as in AdaFace's head.py; ``norms`` unused."""
    cos = cosine_logits(embeddings, kernel, eps)
    onehot = _target_mask(labels, cos.shape[1])
    return s * (cos - onehot * m), (state if state is not None else EmptyState())


HEADS = {"adaface": adaface_logits, "arcface": arcface_logits, "cosface": cosface_logits}


HEAD_PARAMS = {"adaface": ("m", "h", "s", "t_alpha"), "arcface": ("m", "s"), "cosface": ("m", "s")}


def head_params(head_config) -> dict:
    """The keyword arguments of ``HEADS[head_config['name']]`` found in a head config (e.g.
    ``config.head``); fields that are not the head's own parameters are left out."""
    name = head_config["name"]
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; expected one of {sorted(HEADS)}")
    return {k: head_config[k] for k in HEAD_PARAMS[name] if k in head_config}


def initial_state(head: str, stats_from_first_batch: bool = False):
    """The state a head starts from (AdaFace: mean 20, std 100, as the original buffers; with
    ``stats_from_first_batch``, ``AdaFaceState.unseeded()``)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(HEADS)}")
    if head != "adaface":
        return EmptyState()
    return AdaFaceState.unseeded() if stats_from_first_batch else AdaFaceState.create()


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: Optional[int] = None) -> jax.Array:
    """Mean cross-entropy in float32 (``torch.nn.CrossEntropyLoss``), written with masks rather than
    a gather so a class-sharded logits matrix is reduced without being gathered.

    ``num_classes``: only the first ``num_classes`` columns are real classes; the rest (padding of
    the kernel to a multiple of the device count) are excluded from the softmax.  A finite large
    negative value is used instead of -inf so that masked entries times zero stay zero.
    """
    logits = logits.astype(jnp.float32)
    col = jnp.arange(logits.shape[-1])
    if num_classes is not None and num_classes < logits.shape[-1]:
        logits = jnp.where(col[None, :] < num_classes, logits, -1e30)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.sum(jnp.where(col[None, :] == labels[:, None], logits, 0.0), axis=-1)
    return jnp.mean(lse - target)
