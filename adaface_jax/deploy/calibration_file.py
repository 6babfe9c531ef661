"""Where a model's calibrated thresholds are kept, next to its weights.

* a converted directory: the ``calibration`` field of its ``adaface_meta.json``;
* a training workdir (or one of its step folders): ``<workdir>/calibration.json``;
* a PyTorch ``.ckpt`` (never rewritten): the sidecar ``<file>.calibration.json``.

``adaface_jax.checkpoint.load_weights`` returns it as ``meta['calibration']``, so ``compare`` and the
exporters find it wherever the model came from.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from adaface_jax.errors import InputError
from adaface_jax.io import atomic_write

META_NAME = "adaface_meta.json"  # as adaface_jax.convert.convert.META_NAME


def _workdir_of(path: str) -> Optional[str]:
    from adaface_jax.checkpoint import find_step_dir  # noqa: PLC0415

    step_dir = find_step_dir(path)
    if step_dir is None:
        return None
    # <workdir>/checkpoints/<step> or <workdir>/best/<step> -> <workdir>
    parent = os.path.dirname(step_dir)
    return os.path.dirname(parent) if os.path.basename(parent) in ("checkpoints", "best") else parent


def location(model_path: str) -> tuple[str, str]:
    """('meta' | 'file', path of the JSON that holds the calibration)."""
    model_path = os.path.abspath(model_path)
    if os.path.isdir(model_path):
        if os.path.isfile(os.path.join(model_path, META_NAME)):
            return "meta", os.path.join(model_path, META_NAME)
        workdir = _workdir_of(model_path)
        if workdir is None:
            raise InputError(f"{model_path}: not a converted directory or a training workdir")
        return "file", os.path.join(workdir, "calibration.json")
    return "file", model_path + ".calibration.json"


def read(model_path: str) -> Optional[dict]:
    try:
        kind, path = location(model_path)
    except InputError:
        return None
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    return data.get("calibration") if kind == "meta" else data


def store(model_path: str, calibration: dict) -> str:
    """Write the calibration where ``read`` finds it (atomically); returns the file written."""
    kind, path = location(model_path)
    if kind == "meta":
        with open(path) as f:
            meta = json.load(f)
        meta["calibration"] = calibration
        payload = meta
    else:
        payload = calibration
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    return path
