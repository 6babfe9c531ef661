"""THE reader of weights, whatever their format: ``load_weights`` takes a released/Lightning PyTorch
``.ckpt`` (mapped on the fly, read safely), a converted directory (``adaface-jax convert``) or a training
workdir (any of its steps), and returns the same ``LoadedWeights``. It also knows where each format
keeps its calibrated thresholds (``calibration_file``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from adaface_jax import io
from adaface_jax.convert import convert
from adaface_jax.errors import InputError
from adaface_jax.run_dir import RunDir
from adaface_jax.train.checkpointer import find_step_dir, read_step_meta, restore_items, unreadable_is_input_error
from evaluation.calibration import CalibrationFile, read_calibration


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
    """A ``.ckpt``, a converted directory or a training workdir (its latest step, ``step=N``, or the best
    one with ``best=True``). ``arch``, when given, must match what the weights hold. Every failure is an
    ``InputError`` naming the path."""
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
    try:
        where = calibration_file(path)
    except InputError:  # a path no calibration can be stored with carries none
        where = None
    calibration = read_calibration(where) if where is not None else None
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
    with unreadable_is_input_error(ckpt_dir, "the converted checkpoint"):
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(ckpt_dir)
    tree = jax.tree_util.tree_map(np.asarray, tree)
    if not isinstance(tree, dict) or "params" not in tree or "batch_stats" not in tree:
        raise InputError(f"{ckpt_dir}: expected 'params' and 'batch_stats' in the converted checkpoint")
    variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    return LoadedWeights(meta["arch"], variables, tree.get("head"), meta)


def _load_trained_step(step_dir: str) -> LoadedWeights:
    """One of our training checkpoints: the backbone, the head without its device padding, and meta
    (``meta['training']`` is the step's own JSON: arch, num_classes, config, ... plus ``step_dir``)."""
    with unreadable_is_input_error(step_dir, "the training checkpoint"):
        items = jax.device_get(restore_items(step_dir))
    train_meta = read_step_meta(step_dir)
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


def calibration_file(model_path: str) -> CalibrationFile:
    """Where the thresholds of the model at ``model_path`` are stored: the ``calibration`` field of a
    converted directory's metadata, a training workdir's ``calibration.json``, a ``.ckpt``'s sidecar
    ``<file>.calibration.json``. An ``InputError`` for a folder that is neither kind of model."""
    model_path = io.check_path(model_path)
    if io.isdir(model_path):
        if io.isfile(io.join(model_path, convert.META_NAME)):
            return CalibrationFile(io.join(model_path, convert.META_NAME), in_metadata=True)
        step_dir = find_step_dir(model_path)
        if step_dir is None:
            raise InputError(f"{model_path}: not a converted directory or a training workdir")
        return CalibrationFile(RunDir.of_step_dir(step_dir).calibration)
    return CalibrationFile(model_path + ".calibration.json")
