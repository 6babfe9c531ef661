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

import dataclasses
import json
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from adaface_jax import io, parallel
from adaface_jax.convert import convert
from adaface_jax.errors import InputError
from adaface_jax.run_dir import BEST, CHECKPOINTS, RunDir


class Checkpointer:
    """Two orbax managers (latest K / best 1) behind one small interface."""

    def __init__(self, run_dir: RunDir, *, max_to_keep: int = 3, async_save: bool = True,
                 best_metric: str = "mean_acc"):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir.of(run_dir)
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            self.run_dir.checkpoints,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "meta"))
        self.best = ocp.CheckpointManager(
            self.run_dir.best,
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

    def item_metadata(self, step: int) -> Any:
        """The saved state's tree of array metadata (shapes, dtypes), read without restoring any array."""
        return state_metadata(io.join(self.run_dir.checkpoints, str(step)))

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
    path = io.check_path(path)
    state_dir = io.join(path, "state")
    if not io.isdir(state_dir):
        raise InputError(f"{path} is not a checkpoint step directory (missing {state_dir})")
    if target_items is None:
        target_items = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                           sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
            state_metadata(path))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(state_dir, target_items)


def state_metadata(step_dir: str) -> Any:
    """The ``state`` item of one step directory as a tree of array metadata (shape, dtype), no array read."""
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(io.join(step_dir, "state"))
    return meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta


def find_step_dir(path: str, *, best: bool = False, step: Optional[int] = None) -> Optional[str]:
    """A training workdir, its ``checkpoints``/``best`` folder, or one step directory -> the step
    directory to read (the latest step, the best one with ``best=True``, or ``step``); None when there
    is none."""
    path = io.check_path(path)
    if io.isdir(io.join(path, "state")):
        return path
    for folder in ([io.join(path, BEST)] if best else []) + [io.join(path, CHECKPOINTS), path]:
        if not io.isdir(folder):
            continue
        steps = sorted(int(d) for d in io.listdir(folder) if d.isdigit())
        if step is not None:
            steps = [s for s in steps if s == step]
        # finalized only: on gs:// orbax writes a step in place and marks it done with commit_success.txt, so
        # the step folder a killed save left behind is listed too (orbax itself would refuse to read it)
        steps = [s for s in steps if io.isdir(io.join(folder, str(s), "state"))
                 and ocp.step.is_path_finalized(io.join(folder, str(s)))]
        if steps:
            return io.join(folder, str(steps[-1]))
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _read_step_meta(step_dir: str) -> dict:
    """The JSON ``meta`` item of one step directory, through orbax (empty when the step has none)."""
    if not io.isdir(io.join(step_dir, "meta")):
        return {}
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            return dict(ckptr.restore(step_dir, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})
    except Exception as e:  # noqa: BLE001  (orbax raises many kinds for a damaged step directory)
        raise InputError(f"{step_dir}/meta: the checkpoint metadata cannot be read: {type(e).__name__}: "
                         f"{_first_line(e)}") from e


@dataclasses.dataclass
class LoadedWeights:
    """What every reader of weights gets: ``arch``; ``variables`` = {'params', 'batch_stats'} of the
    backbone (numpy); ``head`` = {'kernel' (E, C)[, 'batch_mean', 'batch_std']} or None; ``meta`` (input
    size, width, source, and ``calibration`` when ``adaface-jax calibrate`` stored thresholds).
    Unpacks as the tuple ``(arch, variables, head, meta)``."""

    arch: str
    variables: dict
    head: Optional[dict]
    meta: dict

    def __iter__(self):
        return iter((self.arch, self.variables, self.head, self.meta))


def load_weights(path: str, arch: Optional[str] = None, *, step: Optional[int] = None,
                 best: bool = False) -> LoadedWeights:
    """THE weights loader: a released/Lightning PyTorch ``.ckpt`` (mapped on the fly, read safely), a
    converted directory (``adaface-jax convert``) or a training workdir (its latest step, ``step=N``,
    or the best one with ``best=True``). ``arch``, when given, must match what the weights hold.
    Every failure is an ``InputError`` naming the path."""
    path = io.check_path(path, "weights")
    if io.isdir(path) and io.isfile(io.join(path, convert.META_NAME)):
        loaded = _load_converted(path)
    elif io.isdir(path):
        step_dir = find_step_dir(path, best=best, step=step)
        if step_dir is None:
            which = f"step {step}" if step is not None else ("a best checkpoint" if best else "checkpoints/<step>/state")
            raise InputError(f"{path}: {convert.META_NAME} missing and no {which}; expected a converted directory, "
                             "a training workdir or a PyTorch .ckpt file")
        loaded = _load_trained_step(step_dir)
    else:
        loaded = _load_torch(path, arch)
    if arch is not None and arch != loaded.arch:
        raise InputError(f"{path} holds {loaded.arch}, not the requested {arch}")
    calibration = read_calibration(path)
    if calibration is not None:
        loaded.meta["calibration"] = calibration
    return loaded


def _load_torch(path: str, arch: Optional[str]) -> LoadedWeights:
    arch, input_size, variables, head, extras = convert.map_torch_file(path, arch)
    meta = convert.make_meta(arch, input_size, variables, head, source=io.basename(path), **extras)
    return LoadedWeights(arch, variables, head, meta)


def _load_converted(path: str) -> LoadedWeights:
    meta_path = io.join(path, convert.META_NAME)
    try:
        meta = json.loads(io.read_text(meta_path))
    except ValueError as e:
        raise InputError(f"{meta_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("arch") is None:
        raise InputError(f"{meta_path}: expected a JSON object with an 'arch' field")
    ckpt_dir = io.join(path, convert.CKPT_NAME)
    if not io.isdir(ckpt_dir):
        raise InputError(f"{path}: {convert.CKPT_NAME}/ missing next to {convert.META_NAME}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(ckpt_dir)
    except Exception as e:  # noqa: BLE001  (orbax raises many kinds for a damaged directory)
        raise InputError(f"{ckpt_dir}: the converted checkpoint cannot be read (incomplete or corrupt?): "
                         f"{type(e).__name__}: {_first_line(e)}") from e
    tree = jax.tree_util.tree_map(np.asarray, tree)
    if not isinstance(tree, dict) or "params" not in tree or "batch_stats" not in tree:
        raise InputError(f"{ckpt_dir}: expected 'params' and 'batch_stats' in the converted checkpoint")
    variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    return LoadedWeights(meta["arch"], variables, tree.get("head"), meta)


def _load_trained_step(step_dir: str) -> LoadedWeights:
    """One of our training checkpoints: the backbone, the head without its device padding, and meta."""
    try:
        items = jax.device_get(restore_items(step_dir))
    except Exception as e:  # noqa: BLE001  (orbax raises many kinds for a damaged step directory)
        raise InputError(f"{step_dir}: the training checkpoint cannot be read (incomplete or corrupt?): "
                         f"{type(e).__name__}: {_first_line(e)}") from e
    train_meta = _read_step_meta(step_dir)
    got_arch = train_meta.get("arch")
    if not got_arch:
        raise InputError(f"{step_dir}: checkpoint metadata names no arch")
    kernel = np.asarray(items["params"]["head"]["kernel"])
    if train_meta.get("num_classes"):
        kernel = kernel[:, : int(train_meta["num_classes"])]  # drop the columns padded for the device count
    head = {"kernel": kernel, **{k: np.asarray(v) for k, v in dict(items.get("head_state") or {}).items()}}
    variables = {"params": items["params"]["backbone"], "batch_stats": items["batch_stats"]}
    config = train_meta.get("config", {})
    size = int(config.get("data", {}).get("image_size", 112))
    meta = convert.make_meta(got_arch, size, variables, head, source=step_dir,
                             width=int(config.get("model", {}).get("width", 64)))
    meta["training"] = {**train_meta, "step_dir": step_dir}
    return LoadedWeights(got_arch, variables, head, meta)


def load_trained(path: str, *, best: bool = False) -> tuple[dict, dict, dict]:
    """One of our training checkpoints -> ``(variables, head, meta)`` (``load_weights`` in the old
    shape; ``meta`` is the step's own JSON: arch, num_classes, config, ... plus ``step_dir``)."""
    step_dir = find_step_dir(path, best=best)
    if step_dir is None:
        raise InputError(f"{path}: no training checkpoint (expected <workdir>/checkpoints/<step>/state)")
    loaded = _load_trained_step(step_dir)
    return loaded.variables, loaded.head, loaded.meta["training"]


# ---------------------------------------------------------------------------------------------
# Calibrated thresholds (``adaface-jax calibrate``), kept next to the weights:
#   a converted directory: the ``calibration`` field of its adaface_meta.json;
#   a training workdir (or one of its step folders): <workdir>/calibration.json;
#   a PyTorch .ckpt (never rewritten): the sidecar <file>.calibration.json.
# ``load_weights`` returns it as ``meta['calibration']``.

def calibration_location(model_path: str) -> tuple[str, str]:
    """('meta' | 'file', path of the JSON that holds the calibration)."""
    model_path = io.check_path(model_path)
    if io.isdir(model_path):
        if io.isfile(io.join(model_path, convert.META_NAME)):
            return "meta", io.join(model_path, convert.META_NAME)
        step_dir = find_step_dir(model_path)
        if step_dir is None:
            raise InputError(f"{model_path}: not a converted directory or a training workdir")
        return "file", RunDir.of_step_dir(step_dir).calibration
    return "file", model_path + ".calibration.json"


def read_calibration(model_path: str) -> Optional[dict]:
    try:
        kind, path = calibration_location(model_path)
    except InputError:
        return None
    if not io.isfile(path):
        return None
    try:
        data = json.loads(io.read_text(path))
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if kind == "meta" and not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object (the converted model's metadata)")
    # The structure of the thresholds is checked where they are used (evaluation.calibration.check_calibration),
    # so a damaged sidecar does not stop commands that never read it.
    return data.get("calibration") if kind == "meta" else data


def store_calibration(model_path: str, calibration: dict) -> str:
    """Write the calibration where ``read_calibration`` finds it (atomically); returns the file written."""
    kind, path = calibration_location(model_path)
    if kind == "meta":
        meta = json.loads(io.read_text(path))
        if not isinstance(meta, dict):
            raise InputError(f"{path}: expected a JSON object (the converted model's metadata)")
        payload = {**meta, "calibration": calibration}
    else:
        payload = calibration
    io.write_json(path, payload, indent=2, sort_keys=True)
    return path
