"""``TrainState``: everything a step reads and writes, as one pytree (checkpointed whole)."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from adaface_jax import heads


@flax.struct.dataclass
class TrainState:
    """Fields:
      step: batches consumed so far (int32, 0-d); also the data position for an exact resume.
        It advances on skipped (non-finite) steps too; the LR schedule follows the optimizer's own
        count, which does not.
      params: {'backbone': IResNet params, 'head': {'kernel': (E, C_padded)}}.
      batch_stats: IResNet BatchNorm running statistics.
      head_state: margin-head state (``AdaFaceState`` or ``EmptyState``).
      opt_state: optax state of ``tx``.
      rng: base PRNG key; the step's dropout key is ``fold_in(rng, step)`` so a resumed run draws
        the same masks.
      skipped_in_row / skipped_total: non-finite steps skipped consecutively / in total.
      tx: the optax transformation (static, not saved).
      loss_scale: ``LossScaleState`` (scale, good_steps) of float16 training (``adaface_jax.train.loss_scale``),
        checkpointed; None for float32/bfloat16, whose checkpoints then hold exactly the fields above.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    head_state: Any
    opt_state: Any
    rng: jax.Array
    skipped_in_row: jax.Array
    skipped_total: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    loss_scale: Any = None

    def checkpoint_items(self) -> dict:
        """The state as a plain dict of arrays (what orbax saves; ``tx`` is rebuilt from the config)."""
        return {f: getattr(self, f) for f in CHECKPOINT_FIELDS if getattr(self, f) is not None}

    def replace_from_checkpoint(self, items: dict) -> "TrainState":
        return self.replace(**{f: items[f] for f in CHECKPOINT_FIELDS if f in items})


CHECKPOINT_FIELDS = ("step", "params", "batch_stats", "head_state", "opt_state", "rng", "skipped_in_row",
                     "skipped_total", "loss_scale")


def init_variables(model, rng: jax.Array, num_classes: int, *, padded_classes: int | None = None,
                   head: str = "adaface", image_size: int = 112, embedding_size: int = 512):
    """Fresh (params, batch_stats, head_state): backbone init plus the head kernel (E, padded_classes).

    The first ``num_classes`` columns do not depend on the padding, so runs on different device
    counts start from the same model; padding columns are valid unit vectors (a zero column would
    put NaN into the normalisation and its gradient) that the loss masks out.
    """
    backbone_rng, head_rng = jax.random.split(rng)
    padded_classes = padded_classes or num_classes
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init({"params": backbone_rng, "dropout": backbone_rng}, x, train=False)
    kernel = heads.init_kernel(head_rng, embedding_size, num_classes)
    if padded_classes > num_classes:
        pad = heads.init_kernel(jax.random.fold_in(head_rng, 1), embedding_size, padded_classes - num_classes)
        kernel = jnp.concatenate([kernel, pad], axis=1)
    params = {"backbone": variables["params"], "head": {"kernel": kernel}}
    return params, variables.get("batch_stats", {}), heads.initial_state(head)


def create_train_state(params, batch_stats, head_state, tx: optax.GradientTransformation,
                       rng: jax.Array, loss_scale: Any = None) -> TrainState:
    """``loss_scale``: a ``LossScaleState`` for float16 training, else None."""
    # One buffer per counter: a shared zero would make ``jit(..., donate_argnums=0)`` donate it twice.
    def zero():
        return jnp.zeros((), jnp.int32)

    return TrainState(step=zero(), params=params, batch_stats=batch_stats, head_state=head_state,
                      opt_state=tx.init(params), rng=rng, skipped_in_row=zero(), skipped_total=zero(), tx=tx,
                      loss_scale=loss_scale)
