"""Which cosine means "same person"? Thresholds at target false accept rates, from a verification set.

Given the cosine similarity of every pair of a verification set (genuine and impostor pairs), the
threshold at a false accept rate f is the smallest observed impostor score t such that at most
``floor(f * n_impostor)`` impostor pairs score above it; the decision rule is ``same iff cosine > t``.
A FAR is *supported* only when the set has enough impostor pairs for it (``f * n_impostor >= 1``):
below that every threshold reaches FAR 0 on this set and says nothing about f.

The true and false accept rates that a threshold really gives on unseen pairs are estimated by
k-fold cross-validation (contiguous folds, as the verification protocol): the threshold comes from
the other folds, the rates from the held-out fold.

The thresholds are stored next to the model's weights (``CalibrationFile``, ``store_calibration``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

import numpy as np

from adaface_jax import io
from adaface_jax.errors import InputError
from evaluation import ProtocolError

FAR_TARGETS = (1e-2, 1e-3, 1e-4, 1e-5)
RULE = "same person iff cosine > threshold"


def pair_cosines(features: np.ndarray) -> np.ndarray:
    """Interleaved unit embeddings (2N, D) -> cosine of pair i = rows 2i and 2i+1 (float64)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] % 2:
        raise ProtocolError(f"features must be (2N, D) with pairs interleaved, got shape {features.shape}")
    return np.sum(features[0::2] * features[1::2], axis=1)


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """Smallest observed impostor score t with ``#(impostor > t) <= floor(far * n)``."""
    s = np.sort(np.asarray(impostor_scores, np.float64))[::-1]
    if s.size == 0:
        raise ProtocolError("no impostor pairs: a false accept rate cannot be calibrated")
    k = int(math.floor(far * s.size + 1e-9))
    return float(s[min(k, s.size - 1)])


def supported(far: float, num_impostor: int) -> bool:
    return far * num_impostor >= 1.0 - 1e-9


def _fold_slices(n: int, k: int) -> list[slice]:
    sizes = np.full(k, n // k, np.int64)
    sizes[: n % k] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def calibrate(scores: np.ndarray, issame: np.ndarray, fars=FAR_TARGETS, nrof_folds: int = 10) -> dict:
    """Thresholds at each supported FAR, with the rates they give on held-out folds.

    Returns ``{'rule', 'num_pairs', 'num_genuine', 'num_impostor', 'thresholds': {far: {...}},
    'unsupported': {far: reason}}`` where each threshold entry holds ``threshold`` (from all pairs),
    ``tar`` and ``far`` on all pairs, and ``held_out_tar``/``held_out_far`` mean and std over folds.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    issame = np.asarray(issame).astype(bool).reshape(-1)
    if scores.size != issame.size:
        raise ProtocolError(f"{scores.size} pair scores but {issame.size} pair labels")
    if not np.all(np.isfinite(scores)):
        bad = np.flatnonzero(~np.isfinite(scores))
        raise ProtocolError(f"{bad.size} pair scores are not finite (pairs {bad[:5].tolist()}...): "
                            "a feature row is NaN or zero")
    genuine, impostor = scores[issame], scores[~issame]
    if genuine.size == 0 or impostor.size == 0:
        raise ProtocolError(f"calibration needs genuine and impostor pairs; the set has {genuine.size} genuine "
                            f"and {impostor.size} impostor pairs")
    if scores.size < nrof_folds:
        raise ProtocolError(f"{scores.size} pairs are too few for {nrof_folds} folds")
    folds = _fold_slices(scores.size, nrof_folds)
    out = {"rule": RULE, "num_pairs": int(scores.size), "num_genuine": int(genuine.size),
           "num_impostor": int(impostor.size), "folds": nrof_folds, "thresholds": {}, "unsupported": {}}
    for far in fars:
        key = f"{far:g}"
        if not supported(far, impostor.size):
            need = int(math.ceil(1.0 / far))
            out["unsupported"][key] = (f"FAR={key} needs at least {need} impostor pairs to mean anything; "
                                       f"the set has {impostor.size}")
            continue
        thr = threshold_at_far(impostor, far)
        held_tar, held_far = [], []
        for fold in folds:
            train = np.ones(scores.size, bool)
            train[fold] = False
            train_imp = scores[train & ~issame]
            t = threshold_at_far(train_imp, far)
            test_s, test_same = scores[fold], issame[fold]
            if test_same.any():
                held_tar.append(float(np.mean(test_s[test_same] > t)))
            if (~test_same).any():
                held_far.append(float(np.mean(test_s[~test_same] > t)))
        out["thresholds"][key] = {
            "far_target": far, "threshold": thr,
            "tar": float(np.mean(genuine > thr)), "far": float(np.mean(impostor > thr)),
            "held_out_tar_mean": float(np.mean(held_tar)), "held_out_tar_std": float(np.std(held_tar)),
            "held_out_far_mean": float(np.mean(held_far)), "held_out_far_std": float(np.std(held_far)),
            "reliable": bool(far * impostor.size >= 10),
        }
    if not out["thresholds"]:
        raise ProtocolError(f"no target FAR is supported by {impostor.size} impostor pairs "
                            f"(the largest asked for, {max(fars):g}, needs {int(math.ceil(1 / max(fars)))})")
    return out


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_calibration(cal, where: str) -> dict:
    """Stored thresholds as ``calibrate`` writes them, checked before use: a JSON object whose
    ``thresholds`` maps each FAR to an object with a finite number ``threshold`` (optional fields, when
    present, have their types). ``where`` names the file (and field) in the ProtocolError."""
    if not isinstance(cal, dict):
        raise ProtocolError(f"{where}: expected a JSON object of calibrated thresholds (as `adaface-jax calibrate` "
                            f"writes), got a {_json_type(cal)}")
    if "thresholds" not in cal:
        raise ProtocolError(f"{where}: missing key 'thresholds' (as `adaface-jax calibrate` writes); "
                            f"it has {sorted(map(str, cal))}")
    thresholds = cal["thresholds"]
    if not isinstance(thresholds, dict) or not thresholds:
        raise ProtocolError(f"{where}: key 'thresholds' must be a non-empty object mapping a FAR to its threshold, "
                            f"got {'an empty object' if isinstance(thresholds, dict) else 'a ' + _json_type(thresholds)}")
    for far, entry in thresholds.items():
        key = f"thresholds.{far}"
        try:
            value = float(far)
        except ValueError:
            value = float("nan")
        if not 0.0 < value < 1.0:
            raise ProtocolError(f"{where}: key {key!r}: expected a false accept rate in (0, 1) as the key")
        if not isinstance(entry, dict):
            raise ProtocolError(f"{where}: key {key!r} must be an object with a 'threshold', got a "
                                f"{_json_type(entry)}")
        if "threshold" not in entry:
            raise ProtocolError(f"{where}: missing key '{key}.threshold'")
        if not _is_number(entry["threshold"]):
            raise ProtocolError(f"{where}: key '{key}.threshold' must be a finite number, got "
                                f"{entry['threshold']!r}")
    for field, types, what in (("rule", (str,), "a string"), ("source", (str,), "a string"),
                               ("flip_test", (bool, type(None)), "true, false or null"),
                               ("unsupported", (dict,), "an object")):
        if field in cal and not isinstance(cal[field], types):
            raise ProtocolError(f"{where}: key {field!r} must be {what}, got {cal[field]!r}")
    return cal


def _json_type(x) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number" if isinstance(x, (int, float)) else type(x).__name__)


def decide(cosine: float, calibration: dict) -> dict:
    """``{far: bool}``: is this cosine a "same person" decision at each calibrated FAR?"""
    return {key: bool(cosine > entry["threshold"]) for key, entry in calibration.get("thresholds", {}).items()}


def format_calibration(cal: dict) -> str:
    lines = [f"{cal['num_pairs']} pairs ({cal['num_genuine']} genuine, {cal['num_impostor']} impostor); {cal['rule']}",
             f"{'FAR':>8s}  {'threshold':>9s}  {'TAR (all)':>9s}  {'held-out TAR':>16s}  {'held-out FAR':>20s}"]
    for key, e in cal["thresholds"].items():
        note = "" if e["reliable"] else "  (fewer than 10 expected false accepts: rough)"
        lines.append(f"{key:>8s}  {e['threshold']:9.4f}  {e['tar']:9.4f}  {e['held_out_tar_mean']:8.4f} ± "
                     f"{e['held_out_tar_std']:.4f}  {e['held_out_far_mean']:10.2e} ± {e['held_out_far_std']:.1e}{note}")
    for key, why in cal["unsupported"].items():
        lines.append(f"{key:>8s}  not calibrated: {why}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Stored thresholds (``adaface-jax calibrate``) live next to the model's weights, in a JSON file:
#   a converted directory: the ``calibration`` field of its metadata JSON object;
#   a training workdir (or one of its step folders): <workdir>/calibration.json;
#   a PyTorch .ckpt (never rewritten): the sidecar <file>.calibration.json.
# Which file a model has is ``adaface_jax.weights.calibration_file`` (it knows the weight formats);
# ``load_weights`` returns what is stored as ``meta['calibration']``.

@dataclasses.dataclass(frozen=True)
class CalibrationFile:
    """The JSON file holding a model's thresholds: all of it, or (``in_metadata``) the ``calibration``
    field of the JSON object at ``path`` (a converted model's metadata)."""

    path: str
    in_metadata: bool = False

    def __str__(self) -> str:
        """How an error names it."""
        return f"{self.path} (its 'calibration' field)" if self.in_metadata else self.path


def _read_metadata_object(path: str) -> dict:
    try:
        data = json.loads(io.read_text(path))
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object (the converted model's metadata)")
    return data


def read_calibration(where: CalibrationFile) -> Optional[dict]:
    """What is stored (None when nothing is). Its structure is checked where it is used
    (``check_calibration``), so a damaged file does not stop commands that never read it."""
    if not io.isfile(where.path):
        return None
    if where.in_metadata:
        return _read_metadata_object(where.path).get("calibration")
    try:
        return json.loads(io.read_text(where.path))
    except ValueError as e:
        raise InputError(f"{where.path}: not valid JSON ({e})") from e


def store_calibration(where: CalibrationFile, calibration: dict) -> str:
    """Write ``calibration`` where ``read_calibration`` finds it (atomically); returns the file written."""
    payload = ({**_read_metadata_object(where.path), "calibration": calibration} if where.in_metadata
               else calibration)
    io.write_json(where.path, payload, indent=2, sort_keys=True)
    return where.path
