"""Shared helpers for the training tests: a tiny backbone with the IResNet's contract and a
deterministic numpy batch source."""
from __future__ import annotations

import numpy as np

from adaface_jax.train.tiny import TinyBackbone as TinyNet  # noqa: F401


def random_batch(seed: int, batch: int, num_classes: int, size: int = 16):
    rs = np.random.RandomState(seed)
    return {"image": rs.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
            "label": rs.randint(0, num_classes, (batch,)).astype(np.int32)}


E = 16
ADA = dict(m=0.4, h=0.333, s=64.0, t_alpha=0.01)


def build_sharded(devices, num_classes, groups=1):
    """(mesh, state, jitted step) for TinyNet + AdaFace on a mesh over ``devices``; the kernel is padded
    for 8 devices so meshes of 1, 4 and 8 devices start from the same model.  ``groups``: BatchNorm and
    AdaFace statistics per contiguous group of the batch (= device count for the per-device option)."""
    import jax  # noqa: PLC0415

    from adaface_jax import parallel  # noqa: PLC0415
    from adaface_jax.train import optimizer as optim  # noqa: PLC0415
    from adaface_jax.train.state import create_train_state, init_variables  # noqa: PLC0415
    from adaface_jax.train.step import StepConfig, make_train_step  # noqa: PLC0415

    mesh = parallel.make_mesh(devices)
    model = TinyNet(embedding_size=E, bn_groups=groups)
    padded = parallel.padded_num_classes(num_classes, 8)
    schedule = optim.lr_schedule(0.1, 2, (1,))

    def init(rng):
        p, bs, hs = init_variables(model, rng, num_classes, padded_classes=padded, image_size=16, embedding_size=E)
        return create_train_state(p, bs, hs, optim.make_optimizer(schedule, p, bs), jax.random.fold_in(rng, 1))

    state, shardings = parallel.create_sharded(init, mesh, jax.random.PRNGKey(0))
    cfg = StepConfig(head="adaface", head_kwargs=ADA, num_classes=num_classes, head_num_groups=groups,
                     lr_fn=schedule, embedding_sharding=parallel.embedding_sharding(mesh),
                     logits_sharding=parallel.logits_sharding(mesh))
    return mesh, state, parallel.jit_sharded(make_train_step(model, cfg), mesh, shardings)


def run_sharded(devices, num_classes=20, steps=2, groups=1, batch=16):
    """Run ``steps`` steps on global batches ``random_batch(i, batch)``; each process feeds its own rows.
    Returns (state items, metrics) as host numpy (sharded arrays gathered across processes)."""
    import jax  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    from adaface_jax import parallel  # noqa: PLC0415

    mesh, state, step = build_sharded(devices, num_classes, groups)
    n, pid = jax.process_count(), jax.process_index()
    for i in range(steps):
        full = random_batch(i, batch, num_classes)
        rows = batch // n
        local = {k: v[pid * rows:(pid + 1) * rows] for k, v in full.items()}
        state, metrics = step(state, parallel.host_to_global(local, mesh))
    items = state.checkpoint_items()
    if n > 1:
        items = multihost_utils.process_allgather(items, tiled=True)
        metrics = multihost_utils.process_allgather(metrics, tiled=True)
    return jax.device_get(items), jax.device_get(metrics)
