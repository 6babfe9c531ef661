"""The pure training step: ``train_step(state, batch) -> (state, metrics)``.

Numerics: the backbone computes in its own ``dtype`` (bfloat16 for mixed precision) with float32
parameters; the margin head, the softmax and the loss are float32.

Gradient accumulation (``accum_steps = k``): the batch is split into k micro-batches, each run in
train mode in sequence.  Semantics, precisely:
  * the update uses the MEAN of the k micro-batch gradients of the mean loss; for a model without
    batch-dependent statistics this equals one step on the whole batch;
  * BatchNorm normalises each micro-batch with its own statistics, and the running statistics are
    updated k times (once per micro-batch, in order);
  * the AdaFace norm EMA is likewise updated once per micro-batch, in order, and each micro-batch's
    margins use the EMA after its own update (as k successive forward passes would).
Micro-batch i takes rows ``i, i+k, i+2k, ...`` so every device holds an equal share of each.

Non-finite loss or gradients: params, batch_stats, head_state and opt_state are kept unchanged;
``step`` still advances (it is the data position) and ``skipped_in_row``/``skipped_total`` count.
The loop stops when ``skipped_in_row`` reaches its limit.

float16 (``StepConfig.loss_scale``): the loss is multiplied by ``state.loss_scale.scale`` before
differentiation and the gradients divided by it; a non-finite step is skipped as above and the scale
backs off, finite steps grow it (``adaface_jax.train.loss_scale``, GradScaler semantics).

Partial FC (``StepConfig.sample_rate < 1``): the softmax runs over sampled classes on each kernel
shard (``adaface_jax.train.partial_fc``); ``sample_rate == 1`` is the full softmax, unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from adaface_jax import heads, parallel
from adaface_jax.train import loss_scale as ls
from adaface_jax.train import partial_fc


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step.

    head: the head config as it is (``config.head``: ``name`` plus its parameters m, h, s, t_alpha /
      m, s; other fields are ignored), or just the name with the parameters in ``head_kwargs``.
    num_classes: real classes; kernel columns beyond it (device padding) are masked out.
    head_num_groups: 1 = AdaFace statistics over the global batch; ndev = per device (original DDP).
    accum_steps: micro-batches per update.
    lr_fn: the schedule (for the 'lr' metric only; the optimizer holds its own copy).
    embedding_sharding / logits_sharding: optional sharding constraints (see adaface_jax.parallel):
      the embeddings are replicated (all-gathered, B x E) and the logits stay sharded by class so the
      (E, C) kernel is never gathered.
    sample_rate: Partial FC's sampling rate r (1.0: the full softmax); r < 1 runs the head under
      ``shard_map`` on ``mesh`` (default: the mesh of ``embedding_sharding``, else the first device).
    loss_scale: a ``LossScaleConfig`` for float16 compute (the state then holds a ``LossScaleState``);
      None: no scaling.
    """

    head: Any = "adaface"
    head_kwargs: dict = dataclasses.field(default_factory=dict)
    num_classes: int = 0
    head_num_groups: int = 1
    accum_steps: int = 1
    lr_fn: Optional[Callable] = None
    embedding_sharding: Any = None
    logits_sharding: Any = None
    sample_rate: float = 1.0
    mesh: Any = None
    loss_scale: Any = None

    def __hash__(self):
        return id(self)

    @property
    def head_name(self) -> str:
        return self.head if isinstance(self.head, str) else str(self.head["name"])

    def head_params(self) -> dict:
        """The head function's keyword arguments (``heads.head_params`` of the head config)."""
        if isinstance(self.head, str):
            return dict(self.head_kwargs)
        return heads.head_params(self.head)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def make_loss_fn(model, cfg: StepConfig):
    """loss(params, batch_stats, head_state, images, labels, dropout_rng, quality=None) -> (loss, (bs, hs, aux)).

    ``quality``: per-image true quality for AdaFace's oracle margin (``heads.adaface_logits(quality=...)``);
    given only when the batch carries a ``'quality'`` entry."""
    head_fn = heads.HEADS[cfg.head_name]
    head_kwargs = cfg.head_params()
    if cfg.head_name == "adaface":
        head_kwargs["num_groups"] = cfg.head_num_groups
    num_classes = cfg.num_classes
    if cfg.sample_rate < 1.0:
        mesh = cfg.mesh if cfg.mesh is not None else getattr(cfg.embedding_sharding, "mesh", None)
        if mesh is None:
            mesh = parallel.make_mesh(jax.devices()[:1])

    def loss_fn(params, batch_stats, head_state, images, labels, dropout_rng, quality=None):
        oracle = {} if quality is None else {"quality": quality}
        if oracle and (cfg.head_name != "adaface" or cfg.sample_rate < 1.0):
            raise ValueError("a batch 'quality' (the oracle margin) needs head 'adaface' and the full softmax")
        (emb, norm), mutated = model.apply({"params": params["backbone"], "batch_stats": batch_stats}, images,
                                           train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        emb = _constrain(emb.astype(jnp.float32), cfg.embedding_sharding)
        norm = _constrain(norm.astype(jnp.float32), cfg.embedding_sharding)
        labels_r = _constrain(labels, None if cfg.embedding_sharding is None else
                              jax.sharding.NamedSharding(cfg.embedding_sharding.mesh, jax.sharding.PartitionSpec()))
        if cfg.sample_rate < 1.0:
            loss, new_head_state = partial_fc.sampled_head_loss(
                head_fn, head_kwargs, emb, norm, labels_r, params["head"]["kernel"], head_state, dropout_rng,
                mesh=mesh, num_classes=num_classes, sample_rate=cfg.sample_rate)
            return loss, (mutated.get("batch_stats", batch_stats), new_head_state, jnp.mean(norm))
        logits, new_head_state = head_fn(emb, norm, labels_r, params["head"]["kernel"], head_state, **head_kwargs,
                                         **oracle)
        logits = _constrain(logits, cfg.logits_sharding)
        loss = heads.softmax_cross_entropy(logits, labels_r, num_classes)
        return loss, (mutated.get("batch_stats", batch_stats), new_head_state, jnp.mean(norm))

    return loss_fn


def make_train_step(model, cfg: StepConfig):
    """Return ``train_step(state, batch) -> (state, metrics)`` (pure; jit it with the state donated)."""
    loss_fn = make_loss_fn(model, cfg)
    k = cfg.accum_steps
    unscaled_grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if cfg.loss_scale is not None:
        def scaled_loss(params, batch_stats, head_state, images, labels, rng, scale, quality=None):
            loss, aux = loss_fn(params, batch_stats, head_state, images, labels, rng, quality)
            return loss * scale, (loss, aux)

        scaled_grad = jax.value_and_grad(scaled_loss, has_aux=True)

    def _descaled(scale):
        def fn(*args, quality=None):  # the unscaled loss and gradients of the scaled loss
            (_, (loss, aux)), g = scaled_grad(*args, scale, quality)
            return (loss, aux), jax.tree_util.tree_map(lambda x: x / scale, g)
        return fn

    def compute(state, images, labels, quality):
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = unscaled_grad_fn if cfg.loss_scale is None else _descaled(state.loss_scale.scale)
        if k == 1:
            (loss, (bs, hs, mean_norm)), grads = grad_fn(state.params, state.batch_stats, state.head_state, images,
                                                         labels, rng, quality=quality)
            return loss, grads, bs, hs, mean_norm
        b = images.shape[0]
        if b % k:
            raise ValueError(f"batch of {b} does not split into accum_steps={k} micro-batches")
        # (B, ...) -> (k, B/k, ...) with micro-batch i = rows i, i+k, ...: every device keeps a share.
        split = lambda x: jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
        micro_images, micro_labels = split(images), split(labels)
        micro_quality = None if quality is None else split(quality)

        def body(carry, xs):
            bs, hs, gsum, lsum, nsum = carry
            i, im, lb, q = xs
            (loss, (bs, hs, mean_norm)), g = grad_fn(state.params, bs, hs, im, lb, jax.random.fold_in(rng, i),
                                                     quality=q)
            gsum = jax.tree_util.tree_map(jnp.add, gsum, g)
            return (bs, hs, gsum, lsum + loss, nsum + mean_norm), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        init = (state.batch_stats, state.head_state, zeros, jnp.float32(0), jnp.float32(0))
        (bs, hs, gsum, lsum, nsum), _ = jax.lax.scan(body, init, (jnp.arange(k), micro_images, micro_labels,
                                                                   micro_quality))
        grads = jax.tree_util.tree_map(lambda g: g / k, gsum)
        return lsum / k, grads, bs, hs, nsum / k

    def train_step(state, batch):
        images, labels = batch["image"], batch["label"]
        loss, grads, new_bs, new_hs, mean_norm = compute(state, images, labels, batch.get("quality"))
        updates, new_opt = state.tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        ok = jnp.isfinite(loss) & _all_finite(grads)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            batch_stats=keep(new_bs, state.batch_stats),
            head_state=keep(new_hs, state.head_state),
            opt_state=keep(new_opt, state.opt_state),
            skipped_in_row=jnp.where(ok, 0, state.skipped_in_row + 1),
            skipped_total=state.skipped_total + jnp.where(ok, 0, 1),
        )
        if cfg.loss_scale is not None:
            new_state = new_state.replace(loss_scale=ls.update(state.loss_scale, ok, cfg.loss_scale))
        metrics = {"loss": loss, "skipped": jnp.logical_not(ok).astype(jnp.int32),
                   "skipped_total": new_state.skipped_total, "skipped_in_row": new_state.skipped_in_row,
                   "mean_norm": mean_norm}
        if cfg.loss_scale is not None:
            metrics["loss_scale"] = new_state.loss_scale.scale
        if cfg.lr_fn is not None:
            metrics["lr"] = cfg.lr_fn(state.step - state.skipped_total)
        if isinstance(new_state.head_state, heads.AdaFaceState):
            metrics["batch_mean"] = new_state.head_state.batch_mean[0]
            metrics["batch_std"] = new_state.head_state.batch_std[0]
        return new_state, metrics

    return train_step
