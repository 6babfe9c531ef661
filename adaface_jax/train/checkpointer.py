"""A training run's checkpoints with orbax: the last K by step, plus the best by a validation metric.

Layout of one step directory (the run folder's paths come from ``adaface_jax.run_dir.RunDir``)::

    checkpoints/<step>/state   every TrainState field but the optimizer definition (params incl. the
                               head kernel, batch_stats, head_state, opt_state, step = data position, rng,
                               skip counters)
    checkpoints/<step>/meta    JSON: epoch, arch, head, num_classes, padded_classes, the config
    best/<step>/...            the same items for the best step by the validation metric (one kept)

Saving is asynchronous (orbax writes in a background thread after the device->host copy); restoring
takes target shardings, so a checkpoint written on 8 devices restores on 4 (or any mesh whose device
count divides the padded class count). The functions below read one step directory without a manager
(``adaface_jax.weights`` reads trained weights through them).
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from adaface_jax import io, parallel
from adaface_jax.errors import InputError
from adaface_jax.run_dir import BEST, CHECKPOINTS, RunDir

# The two items of every step directory
STATE = "state"
META = "meta"


class Checkpointer:
    """Two orbax managers (latest K / best 1) behind one small interface."""

    def __init__(self, run_dir: RunDir, *, max_to_keep: int = 3, async_save: bool = True,
                 best_metric: str = "mean_acc", best_mode: str = "max"):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir.of(run_dir)
        self.best_metric = best_metric
        # A best step kept by another metric (e.g. 'mean_acc', before the metric was a config field) cannot be
        # compared: it ranks last, so the first step scored by this metric replaces it.
        worst = float("-inf") if best_mode == "max" else float("inf")
        self.latest = ocp.CheckpointManager(
            self.run_dir.checkpoints,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=async_save),
            item_names=(STATE, META))
        self.best = ocp.CheckpointManager(
            self.run_dir.best,
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True,
                                                 best_fn=lambda m: float(m[best_metric]) if best_metric in m else worst,
                                                 best_mode=best_mode),
            item_names=(STATE, META))

    @staticmethod
    def _args(state, meta: dict):
        return ocp.args.Composite(**{STATE: ocp.args.StandardSave(state.checkpoint_items()),
                                     META: ocp.args.JsonSave(meta)})

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
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target),
                                                                    META: ocp.args.JsonRestore()}))
        return state.replace_from_checkpoint(restored[STATE]), restored[META]

    def item_metadata(self, step: int) -> Any:
        """The saved state's tree of array metadata (shapes, dtypes), read without restoring any array."""
        return state_metadata(io.join(self.run_dir.checkpoints, str(step)))

    def read_meta(self, step: Optional[int] = None, *, best: bool = False) -> dict:
        manager = self.best if best else self.latest
        step = step if step is not None else (manager.best_step() if best else manager.latest_step())
        return manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


# ---------------------------------------------------------------------------------------------
# One step directory, read without a manager

@contextlib.contextmanager
def unreadable_is_input_error(path: str, what: str):
    """An orbax read of ``path`` that fails becomes one ``InputError`` line naming ``path`` and ``what`` it
    held: orbax raises many kinds of exception for a damaged or half-written directory."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        lines = str(e).strip().splitlines()
        raise InputError(f"{path}: {what} cannot be read (incomplete or corrupt?): {type(e).__name__}: "
                         f"{lines[0] if lines else ''}") from e


def restore_items(step_dir: str, target_items: Any = None) -> dict:
    """Read the ``state`` item of one checkpoint step directory (``.../checkpoints/<step>``); arrays come
    back on the first device when no target is given."""
    step_dir = io.check_path(step_dir)
    state_dir = io.join(step_dir, STATE)
    if not io.isdir(state_dir):
        raise InputError(f"{step_dir} is not a checkpoint step directory (missing {state_dir})")
    if target_items is None:
        target_items = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                           sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
            state_metadata(step_dir))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(state_dir, target_items)


def state_metadata(step_dir: str) -> Any:
    """The ``state`` item of one step directory as a tree of array metadata (shape, dtype), no array read."""
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(io.join(step_dir, STATE))
    return meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta


def read_step_meta(step_dir: str) -> dict:
    """The JSON ``meta`` item of one step directory, through orbax (empty when the step has none)."""
    if not io.isdir(io.join(step_dir, META)):
        return {}
    with unreadable_is_input_error(io.join(step_dir, META), "the checkpoint metadata"):
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(step_dir, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return dict(restored[META] or {})


def find_step_dir(path: str, *, best: bool = False, step: Optional[int] = None) -> Optional[str]:
    """A training workdir, its ``checkpoints``/``best`` folder, or one step directory -> the step
    directory to read (the latest step, the best one with ``best=True``, or ``step``); None when there
    is none."""
    path = io.check_path(path)
    if io.isdir(io.join(path, STATE)):
        return path
    for folder in ([io.join(path, BEST)] if best else []) + [io.join(path, CHECKPOINTS), path]:
        if not io.isdir(folder):
            continue
        steps = sorted(int(d) for d in io.listdir(folder) if d.isdigit())
        if step is not None:
            steps = [s for s in steps if s == step]
        # finalized only: on gs:// orbax writes a step in place and marks it done with commit_success.txt, so
        # the step folder a killed save left behind is listed too (orbax itself would refuse to read it)
        steps = [s for s in steps if io.isdir(io.join(folder, str(s), STATE))
                 and ocp.step.is_path_finalized(io.join(folder, str(s)))]
        if steps:
            return io.join(folder, str(steps[-1]))
    return None
