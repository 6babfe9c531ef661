"""Checkpoints with orbax: the last K by step, plus the best by validation accuracy.

Layout under ``workdir``::

    checkpoints/<step>/state   every TrainState field but the optimizer definition (params incl. the
                               head kernel, batch_stats, head_state, opt_state, step = data position, rng,
                               skip counters)
    checkpoints/<step>/meta    JSON: epoch, arch, head, num_classes, padded_classes, the config
    best/<step>/...            the same items for the best validation mean accuracy (one kept)

Saving is asynchronous (orbax writes in a background thread after the device->host copy); restoring
takes target shardings, so a checkpoint written on 8 devices restores on 4 (or any mesh whose device
count divides the padded class count).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from adaface_jax import parallel


class Checkpointer:
    """Two orbax managers (latest K / best 1) behind one small interface."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True, best_metric: str = "mean_acc"):
        self.workdir = os.path.abspath(workdir)
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "meta"))
        self.best = ocp.CheckpointManager(
            os.path.join(self.workdir, "best"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True,
                                                 best_fn=lambda m: float(m[best_metric]), best_mode="max"),
            item_names=("state", "meta"))

    @staticmethod
    def _args(state, meta: dict):
        return ocp.args.Composite(state=ocp.args.StandardSave(state.checkpoint_items()),
                                  meta=ocp.args.JsonSave(meta))

    def save(self, state, meta: dict, *, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        if step in self.latest.all_steps():
            return False
        return self.latest.save(step, args=self._args(state, meta), force=force)

    def save_best(self, state, meta: dict, metrics: dict) -> bool:
        """Keep this state if ``metrics[best_metric]`` beats the best so far."""
        step = int(jax.device_get(state.step))
        if step in self.best.all_steps():
            return False
        return self.best.save(step, args=self._args(state, meta), metrics={k: float(v) for k, v in metrics.items()})

    def latest_step(self) -> Optional[int]:
        return self.latest.latest_step()

    def restore(self, state, mesh=None, step: Optional[int] = None, *, best: bool = False):
        """Restore into the structure of ``state`` (a TrainState, possibly abstract), placing every array
        with ``parallel.state_shardings(mesh, ...)`` (default: the shardings ``state`` already has)."""
        manager = self.best if best else self.latest
        step = manager.best_step() if (best and step is None) else (step if step is not None else manager.latest_step())
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {manager.directory}")
        items = state.checkpoint_items()
        shardings = (parallel.state_shardings(mesh, items) if mesh is not None
                     else jax.tree_util.tree_map(lambda x: x.sharding, items))
        target = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), items,
                                        shardings)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
        return state.replace_from_checkpoint(restored["state"]), restored["meta"]

    def read_meta(self, step: Optional[int] = None, *, best: bool = False) -> dict:
        manager = self.best if best else self.latest
        step = step if step is not None else (manager.best_step() if best else manager.latest_step())
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_items(path: str, target_items: Any = None) -> dict:
    """Read the ``state`` item of one checkpoint step directory (``.../checkpoints/<step>``) without a
    manager, e.g. for ``--init-from``; arrays come back as numpy on the host when no target is given."""
    path = os.path.abspath(path)
    state_dir = os.path.join(path, "state")
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(f"{path} is not a checkpoint step directory (missing {state_dir})")
    with ocp.StandardCheckpointer() as ckptr:
        if target_items is None:
            meta = ckptr.metadata(state_dir)
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
            target_items = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                               sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), tree)
        return ckptr.restore(state_dir, target_items)


def find_step_dir(path: str, *, best: bool = False) -> Optional[str]:
    """A training workdir, its ``checkpoints``/``best`` folder, or one step directory -> the step
    directory to read (latest step, or the best one with ``best=True``); None when there is none."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):
        return path
    for folder in ([os.path.join(path, "best")] if best else []) + [os.path.join(path, "checkpoints"), path]:
        if not os.path.isdir(folder):
            continue
        steps = sorted(int(d) for d in os.listdir(folder) if d.isdigit()
                       and os.path.isdir(os.path.join(folder, d, "state")))
        if steps:
            return os.path.join(folder, str(steps[-1]))
    return None


def load_trained(path: str, *, best: bool = False) -> tuple[dict, dict, dict]:
    """One of our training checkpoints -> ``(variables, head, meta)`` as host numpy arrays.

    ``variables`` = {'params', 'batch_stats'} of the backbone; ``head`` = {'kernel' (E, num_classes)
    without the device padding, and the margin-head statistics}; ``meta`` = the step's JSON (arch,
    num_classes, config, ...)."""
    import json

    import numpy as np

    step_dir = find_step_dir(path, best=best)
    if step_dir is None:
        raise FileNotFoundError(f"{path}: no training checkpoint (expected <workdir>/checkpoints/<step>/state)")
    try:
        items = jax.device_get(restore_items(step_dir))
    except Exception as e:  # noqa: BLE001  (orbax raises many kinds for a damaged step directory)
        from adaface_jax.errors import InputError

        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{step_dir}: the training checkpoint cannot be read (incomplete or corrupt?): "
                         f"{type(e).__name__}: {first}") from e
    meta = {}
    meta_path = os.path.join(step_dir, "meta", "metadata")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except ValueError as e:
            from adaface_jax.errors import InputError

            raise InputError(f"{meta_path}: not valid JSON ({e})") from e
    kernel = np.asarray(items["params"]["head"]["kernel"])
    if meta.get("num_classes"):
        kernel = kernel[:, : int(meta["num_classes"])]  # drop the columns padded for the device count
    head = {"kernel": kernel, **{k: np.asarray(v) for k, v in dict(items.get("head_state") or {}).items()}}
    variables = {"params": items["params"]["backbone"], "batch_stats": items["batch_stats"]}
    meta["step_dir"] = step_dir
    return variables, head, meta
