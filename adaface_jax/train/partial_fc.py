"""Partial FC: the softmax over a sampled subset of the classes (An et al., "Killing Two Birds with One
Stone: Efficient and Robust Training of Face Recognition CNNs by Partial FC", CVPR 2022;
arcface_torch ``PartialFC_V2``), on the class-sharded kernel.

``config.head.sample_rate = r`` (r < 1; the default 1.0 is the full softmax, which does not use this module).

Per step, on every device d of the 'data' mesh axis, with its kernel shard of ``Cl = C_padded / n``
columns (classes ``d*Cl ... d*Cl+Cl-1``):

  * every class of the GLOBAL batch that falls in the shard is kept (the positives);
  * the rest of ``k = num_sampled(...)`` slots are uniformly sampled negatives without replacement:
    ``score = U(0,1)`` per local class, positives get 2 and padding columns (``>= num_classes``) -1,
    and the ``k`` largest scores are taken, sorted by class (``torch.topk`` + sort in PartialFC_V2);
  * the margin head runs on the (B, k) cosine logits of the gathered columns, and the softmax
    cross-entropy reduces over the 'data' axis (psum of the sum of exponentials and of the target
    logit, pmax of the row maximum): the kernel is never gathered, only (B,) vectors are reduced.

``k = min(Cl, max(ceil(r * Cl), B))``: ``ceil(r * C/n)`` as in the paper, but never fewer than the
(micro-)batch size B so every positive fits in the static shape (PartialFC_V2 takes all positives
when they outnumber the sample; with millions of classes ``r * Cl`` is far above B).  A shard with
fewer real classes than ``k`` (only the last one, and only with tiny class counts) fills the
remaining slots with padding columns, which are masked out of the softmax and get no gradient.

Randomness: the scores of device d are ``uniform(fold_in(fold_in(step_rng, SAMPLE_TAG), d), (Cl,))``
where ``step_rng = fold_in(state.rng, state.step)`` (with gradient accumulation: ``fold_in(step_rng,
i)`` for micro-batch i) -- a pure function of (seed, step), so an exact resume samples the same classes.

Gradients reach only the sampled columns; the optimizer still updates the whole kernel, as
``torch.optim.SGD`` does on a parameter whose gradient has zero rows: coupled weight decay and the
momentum buffer keep moving unsampled columns (``p -= lr * (momentum * buf + wd * p)``).
AdaFace's norm statistics depend on the feature norms only and are unaffected by sampling.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from adaface_jax.parallel import DATA

SAMPLE_TAG = 0x50464321  # "PFC!": the sampling stream of a step's key (independent of dropout)


def num_sampled(padded_classes: int, num_devices: int, sample_rate: float, batch: int) -> int:
    """Columns each device keeps: ``min(Cl, max(ceil(r * Cl), batch))`` with ``Cl = padded/num_devices``."""
    local = padded_classes // num_devices
    return int(min(local, max(math.ceil(sample_rate * local), batch)))


def sample_key(step_rng: jax.Array) -> jax.Array:
    """The sampling key of a step (or micro-batch) key; device d folds in its index."""
    return jax.random.fold_in(step_rng, SAMPLE_TAG)


def select_local(scores: jax.Array, labels: jax.Array, offset, num_classes: int, k: int):
    """Sampled local column indices (k,), sorted, and which of them are real classes.

    ``scores``: (Cl,) uniforms of this shard; ``labels``: (B,) global labels; ``offset``: first class of
    the shard.  Positives score 2, padding columns -1, then the top k."""
    cl = scores.shape[0]
    local = labels - offset
    in_shard = (local >= 0) & (local < cl)
    positive = jnp.zeros((cl,), bool).at[jnp.where(in_shard, local, cl)].set(True, mode="drop")
    valid = offset + jnp.arange(cl) < num_classes
    score = jnp.where(positive, 2.0, jnp.where(valid, scores, -1.0))
    _, idx = jax.lax.top_k(score, k)
    idx = jnp.sort(idx)
    return idx, valid[idx]


def local_targets(idx: jax.Array, labels: jax.Array, offset) -> jax.Array:
    """Position of each label among the sampled columns ``idx`` (sorted), -1 where it is not in them."""
    local = labels - offset
    pos = jnp.clip(jnp.searchsorted(idx, local), 0, idx.shape[0] - 1)
    return jnp.where(idx[pos] == local, pos, -1).astype(jnp.int32)


def sampled_head_loss(head_fn, head_kwargs: dict, emb, norm, labels, kernel, head_state, step_rng, *, mesh,
                      num_classes: int, sample_rate: float):
    """Mean cross-entropy over the sampled classes and the head's new state.

    emb (B, E) / norm (B, 1) / labels (B,) replicated; kernel (E, C_padded) sharded ``P(None, 'data')``."""
    n = mesh.shape[DATA]
    k = num_sampled(kernel.shape[1], n, sample_rate, emb.shape[0])
    key = sample_key(step_rng)

    def body(emb, norm, labels, kernel, head_state, key):
        d = jax.lax.axis_index(DATA)
        cl = kernel.shape[1]
        offset = d * cl
        scores = jax.random.uniform(jax.random.fold_in(key, d), (cl,))
        idx, valid = select_local(scores, labels, offset, num_classes, k)
        targets = local_targets(idx, labels, offset)
        w = jnp.take(kernel, idx, axis=1)
        logits, new_state = head_fn(emb, norm, targets, w, head_state, **head_kwargs)
        logits = jnp.where(valid[None, :], logits.astype(jnp.float32), -1e30)
        row_max = jax.lax.pmax(jnp.max(jax.lax.stop_gradient(logits), axis=1), DATA)
        sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1), DATA)
        target = jax.lax.psum(jnp.sum(jnp.where(targets[:, None] == jnp.arange(k)[None, :], logits, 0.0), axis=1),
                              DATA)
        return jnp.mean(jnp.log(sum_exp) + row_max - target), new_state

    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), P(None, DATA), P(), P()), out_specs=(P(), P()))
    return fn(emb, norm, labels, kernel, head_state, key)
