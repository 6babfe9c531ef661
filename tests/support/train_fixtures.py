"""Shared helpers for the training tests: a tiny backbone with the IResNet's contract and a
deterministic numpy batch source."""
from __future__ import annotations

import numpy as np

from adaface_jax.models import TinyBackbone as TinyNet  # noqa: F401


def random_batch(seed: int, batch: int, num_classes: int, size: int = 16):
    rs = np.random.RandomState(seed)
    return {"image": rs.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
            "label": rs.randint(0, num_classes, (batch,)).astype(np.int32)}


E = 16
ADA = dict(m=0.4, h=0.333, s=64.0, t_alpha=0.01)


def tiny_config(num_classes: int, groups: int = 1):
    """The tiny-arch AdaFace recipe of these tests: lr 0.1 stepped at epoch 1 of 2 steps, 16x16 inputs."""
    from configs.common import get_base_config  # noqa: PLC0415

    c = get_base_config(arch="tiny", num_classes=num_classes)
    c.seed = 0
    c.model.embedding_size = E
    c.data.image_size = 16
    c.lr, c.lr_milestones = 0.1, (1,)
    c.precision = "float32"
    c.per_device_stats = groups > 1
    c.head.update(ADA)
    return c


def build_sharded(devices, num_classes, groups=1):
    """(mesh, state, jitted step) for TinyNet + AdaFace on a mesh over ``devices``, through the trainer
    builder; the kernel is padded for 8 devices so meshes of 1, 4 and 8 devices start from the same
    model.  ``groups``: BatchNorm and AdaFace statistics per contiguous group of the batch (= device count
    for the per-device option)."""
    from adaface_jax import parallel  # noqa: PLC0415
    from adaface_jax.train.setup import build_trainer  # noqa: PLC0415

    mesh = parallel.make_mesh(devices)
    trainer = build_trainer(tiny_config(num_classes, groups), mesh, steps_per_epoch=2,
                            padded_classes=parallel.padded_num_classes(num_classes, 8), groups=groups)
    return mesh, trainer.state, trainer.step


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


def flip_fused_accuracy(module, variables, bin_path) -> float:
    """10-fold accuracy of ``v = e(x) n(x) + e(flip x) n(flip x)``, normalised: the original's evaluation
    (validation_step with the flip test, pre_norm_vector_add), computed here with ``module.apply`` and numpy."""
    import jax  # noqa: PLC0415

    from data_pipeline.bin_reader import load_bin  # noqa: PLC0415
    from evaluation.verification import evaluate  # noqa: PLC0415
    images, issame = load_bin(bin_path)
    variables = jax.device_get(variables)
    x = (np.asarray(images, np.float32) / 255.0 - 0.5) / 0.5
    e, n = module.apply(variables, x, train=False)
    ef, nf = module.apply(variables, x[:, :, ::-1], train=False)
    v = np.asarray(e, np.float64) * np.asarray(n) + np.asarray(ef, np.float64) * np.asarray(nf)
    return float(np.mean(evaluate((v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32),
                                  np.asarray(issame, bool))[2]))


def cpu_config(data_dir=None, **fields):
    """configs/cpu_synthetic.py with ``fields`` set, nested keys joined by ``__`` (``evals__verification__every_epochs``)
    and, when given, ``data.data_dir``."""
    import os  # noqa: PLC0415

    from adaface_jax.train.config import load_config  # noqa: PLC0415
    from tests.support import REPO  # noqa: PLC0415

    c = load_config(os.path.join(str(REPO), "configs", "cpu_synthetic.py"))
    if data_dir is not None:
        c.data.data_dir = data_dir
    for key, value in fields.items():
        node = c
        *parents, leaf = key.split("__")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return c
