"""Evaluators as small objects (big_vision's pattern): each holds one protocol's data and scores a model.

    evaluator.run(embed_fn) -> metrics        embed_fn(images) -> (embeddings (N, D), norms (N, 1))
    evaluator.score(features, norms) -> metrics   for features computed elsewhere (the same rows)

``embed_fn`` is injected by the caller (the ``adaface-jax evaluate`` command, the training loop, the
quickstart), so this package never runs a model: it receives arrays. Images are uint8 BGR, aligned
112x112, in the protocol's order; an evaluator may hold them lazily (a callable returning an
iterable) when they do not fit in memory.

Rows that are not finite (NaN rows: photos ``adaface-jax embed`` could not process) are refused with
their count and first row numbers, or, with ``drop_nan=True``, left out together with the pairs,
templates or probes that use them; the metrics then report how many were left out.

The training loop finds its evaluators by name (big_vision's pattern): ``config.evals.<name>.type`` is a key
of ``EVALUATORS`` and the class there

* lists its spec's fields with their defaults (``CONFIG_DEFAULTS``; every spec has ``every_epochs``, the
  period in epochs with 0 for never, and ``batch_size``, the images embedded at a time) and checks them
  (``check_spec(spec, where)``);
* names the metrics each of its runs logs (``metric_names(spec)``): ``config.checkpoint.best_metric`` is one;
* builds itself from its spec (``from_config(spec, data_dir)``) and turns a result into the flat scalars of
  the training log (``scalar_metrics(result)``).

Adding a protocol to training is one class with those and one entry in ``EVALUATORS``.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from adaface_jax import io
from adaface_jax.errors import ConfigError, InputError
from evaluation import ProtocolError, ijb, ijbs, tinyface, verification

EmbedFn = Callable[[object], tuple]
log = logging.getLogger("evaluation.evaluators")


def bad_rows(features, norms=None) -> np.ndarray:
    """Indices of feature rows that are not finite."""
    ok = np.isfinite(np.asarray(features)).all(axis=1)
    if norms is not None:
        ok &= np.isfinite(np.asarray(norms)).reshape(-1)
    return np.flatnonzero(~ok)


def refuse_nan(bad: np.ndarray, n: int, where: str):
    shown = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if bad.size > 10 else "")
    raise ProtocolError(f"{where}: {bad.size} of {n} feature rows are NaN/inf (rows {shown}), e.g. photos "
                        "`adaface-jax embed` could not process; pass --drop-nan to leave them out (with the "
                        "pairs/templates that use them)")


def feature_matrix(arr, where: str, rows: Optional[int] = None) -> np.ndarray:
    """A numeric (N, D) array, N == rows when given; errors name ``where`` (file: key)."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[1] == 0:
        raise ProtocolError(f"{where}: expected a numeric (N, D) array, got dtype {arr.dtype} shape {arr.shape}")
    if rows is not None and arr.shape[0] != rows:
        raise ProtocolError(f"{where}: {arr.shape[0]} rows but the protocol has {rows} images; expected one row "
                            "per image in the protocol's order")
    return arr


def _images(source):
    return source() if callable(source) else source


class VerificationEvaluator:
    """10-fold accuracy of the high-quality pair sets (LFW, CFP-FP, CPLFW, CALFW, AgeDB-30 or any .bin):
    ``sets`` maps a name to ``(images (2N, 112, 112, 3) uint8 BGR, issame (N,))``, pair i = rows 2i, 2i+1
    (images may be None when only ``score`` is used).
    Metrics: ``{'sets': {name: summary incl. 'roc'}, 'mean_accuracy'}``.

    As a training evaluator (type ``verification``), with the flip test as the original's validation:
    ``sets`` names the ``.bin`` files (every one found when empty), looked for in ``bin_dir`` and then the
    data directory; ``max_pairs`` > 0 keeps the first N pairs of each (smoke runs). It logs
    ``val/<set>_acc`` and ``val/mean_acc``."""

    CONFIG_DEFAULTS = {"every_epochs": 1, "batch_size": 256, "sets": verification.HQ_SETS, "bin_dir": "",
                       "max_pairs": 0}

    def __init__(self, sets: Mapping[str, tuple], *, nrof_folds: int = 10, drop_nan: bool = False):
        self.sets = dict(sets)
        self.nrof_folds = nrof_folds
        self.drop_nan = drop_nan
        for name, (images, issame) in self.sets.items():
            n_img = None if images is None or callable(images) else len(images)
            if n_img is not None and n_img != 2 * len(issame):
                raise ProtocolError(f"{name}: {n_img} images but {len(issame)} issame labels; expected 2 images "
                                    "per pair")

    @classmethod
    def check_spec(cls, spec, where: str) -> None:
        if int(spec.max_pairs) < 0:
            raise ConfigError(f"{where}.max_pairs={spec.max_pairs}: expected a count >= 0 (0: every pair)")

    @classmethod
    def metric_names(cls, spec) -> tuple[str, ...]:
        """Named sets that are missing are only warned about, so only the mean is logged by every run."""
        return ("val/mean_acc",)

    @classmethod
    def from_config(cls, spec, data_dir: str, *, where: str = "config.evals.verification") -> "VerificationEvaluator":
        """Reads the spec's .bin sets now (a bad one fails before training starts)."""
        from data_pipeline.bin_reader import load_bin  # noqa: PLC0415

        sets = {}
        for name, path in find_bin_sets(spec, data_dir, where).items():
            images, issame = load_bin(path)
            if spec.max_pairs:
                images, issame = images[: 2 * spec.max_pairs], issame[: spec.max_pairs]
            sets[name] = (images, np.asarray(issame, bool))
        log.info("%s: validation sets %s", where, sorted(sets))
        return cls(sets)

    def scalar_metrics(self, result: dict) -> dict[str, float]:
        """``val/<set>_acc`` for each set and ``val/mean_acc``."""
        out = {f"val/{name}_acc": float(res["accuracy"]) for name, res in result["sets"].items()}
        if out:
            out["val/mean_acc"] = float(result["mean_accuracy"])
        return out

    def run(self, embed_fn: EmbedFn) -> dict:
        return self.score({name: embed_fn(_images(images)) for name, (images, _) in self.sets.items()})

    def pairs(self, name: str, features, where: str):
        """Checked (2N, D) features and N labels of one set; pairs with a NaN row left out (``drop_nan``)."""
        issame = np.asarray(self.sets[name][1])
        feats = feature_matrix(features, where)
        if feats.shape[0] % 2:
            raise ProtocolError(f"{where}: {feats.shape[0]} rows; expected an even number (pair i = rows 2i, 2i+1)")
        if issame.ndim != 1 or issame.size != feats.shape[0] // 2:
            raise ProtocolError(f"{where}: {feats.shape[0]} rows make {feats.shape[0] // 2} pairs but there are "
                                f"{issame.size} issame labels (shape {issame.shape}); expected one label per pair")
        bad = bad_rows(feats)
        if not bad.size:
            return feats, issame.astype(bool), {}
        if not self.drop_nan:
            refuse_nan(bad, feats.shape[0], where)
        pair_bad = np.zeros(issame.size, bool)
        pair_bad[bad // 2] = True
        keep_rows = np.repeat(~pair_bad, 2)
        return feats[keep_rows], issame.astype(bool)[~pair_bad], {"dropped_nan_rows": int(bad.size),
                                                                 "dropped_pairs": int(pair_bad.sum())}

    def score(self, features: Mapping[str, tuple], where: Optional[Mapping[str, str]] = None) -> dict:
        """``features``: name -> (features, norms) (norms unused)."""
        results = {}
        for name, (feats, _) in features.items():
            feats, issame, dropped = self.pairs(name, feats, (where or {}).get(name, f"{name} (features)"))
            res = verification.summarize(name, np.asarray(feats), issame, self.nrof_folds)
            res.update(dropped)
            results[name] = res
        mean = float(np.mean([r["accuracy"] for r in results.values()])) if results else float("nan")
        return {"sets": results, "mean_accuracy": mean}


def find_bin_sets(spec, data_dir: str, where: str) -> dict[str, str]:
    """``{name: path}`` of the .bin files a verification spec asks for: ``spec.sets`` (all when empty) found in
    ``spec.bin_dir`` and then ``data_dir``; ConfigError when there is none."""
    names = list(spec.sets)
    if spec.bin_dir:
        try:
            bin_dir = io.check_path(spec.bin_dir, f"{where}.bin_dir")
        except InputError as e:
            raise ConfigError(str(e)) from e
        if not io.isdir(bin_dir):
            raise ConfigError(f"{where}.bin_dir={spec.bin_dir!r}: directory not found")
    roots = [r for r in (spec.bin_dir, data_dir) if r]
    found = {}
    for root in roots:
        for p in io.glob(io.check_path(root), "*.bin"):
            name = io.basename(p)[: -len(".bin")]
            if (not names or name in names) and name not in found:
                found[name] = p
    missing = [n for n in names if n not in found]
    folders = " or ".join(str(r) for r in roots) or f"(no folder: {where}.bin_dir is empty)"
    if not found:
        raise ConfigError(f"{where}: no {'/'.join(names) if names else '*'}.bin found in {folders}; set "
                          f"{where}.bin_dir, or every_epochs=0 to train without validation")
    if missing:
        log.warning("validation sets not found in %s: %s (validating on %s)", folders,
                    ", ".join(f"{n}.bin" for n in missing), ", ".join(sorted(found)))
    return found


IDENTIFICATION = ("auto", "require", "skip")


class IJBEvaluator:
    """IJB-B / IJB-C 1:1 verification (TAR@FAR) and 1:N identification.
    ``images``: the aligned crops in meta-file line order (the caller aligns them, e.g. with
    ``adaface_jax.align.iter_warped_crops(ijb.crop_paths(meta), meta.landmarks)``).

    ``identification``: "require" -- the three 1:N files (gallery1, gallery2, probe) must be there;
    "auto" -- identification runs when all three are there and is skipped when none is (``skipped_1n``
    then says why and ``missing_1n`` names the expected files), while a meta folder with some but not
    all of them is an error naming the missing ones; "skip" -- verification only."""

    def __init__(self, meta: ijb.IJBMeta, images=None, *, fusion: str = "pre_norm_vector_add",
                 unknown: str = "error", tie: str = "stable", drop_nan: bool = False, identification: str = "auto"):
        self.meta, self.images = meta, images
        self.fusion, self.unknown, self.tie, self.drop_nan = fusion, unknown, tie, drop_nan
        if identification not in IDENTIFICATION:
            raise ProtocolError(f"identification must be one of {IDENTIFICATION}, got {identification!r}")
        self.missing_1n = ijb.missing_1n_files(meta) if identification != "skip" else []
        self.skipped_1n = None
        if identification == "skip":
            self.skipped_1n = "identification not asked for"
        elif self.missing_1n:
            names = ", ".join(self.missing_1n)
            if identification == "require":
                raise ProtocolError(f"{meta.name}: identification asked for but 1:N file(s) missing: {names}")
            if len(self.missing_1n) < len(ijb.ONE_TO_N_KEYS):
                raise ProtocolError(f"{meta.name}: 1:N file(s) missing: {names} (the meta folder has the other 1:N "
                                    "files; add the missing ones, or pass identification='skip' / "
                                    "--identification skip for verification only)")
            self.skipped_1n = f"no 1:N files; expected {names}"
        self.has_1n = self.skipped_1n is None
        if self.has_1n:  # parse the 1:N files before any expensive work
            for k in ijb.ONE_TO_N_KEYS:
                ijb.read_1n_csv(meta.files[k])

    def run(self, embed_fn: EmbedFn) -> dict:
        feats, norms = embed_fn(_images(self.images))
        return self.score(feats, norms)

    def score(self, features, norms=None, *, fusion: Optional[str] = None, where: str = "features") -> dict:
        fusion = fusion or self.fusion
        feats = feature_matrix(features, where, self.meta.num_images)
        if fusion == "pre_norm_vector_add" and norms is None:
            raise ProtocolError(f"{where}: missing array 'norms'; fusion pre_norm_vector_add multiplies each feature "
                                "by its norm")
        meta, dropped = self.meta, {}
        bad = bad_rows(feats, norms)
        if bad.size:
            if not self.drop_nan:
                refuse_nan(bad, feats.shape[0], where)
            keep = np.ones(feats.shape[0], bool)
            keep[bad] = False
            meta, dropped = ijb.drop_images(meta, keep)
            feats = feats[keep]
            norms = None if norms is None else np.asarray(norms)[keep]
            dropped = {"dropped_nan_rows": int(bad.size), **dropped}
        img_feats = ijb.image_features_for_templates(feats, norms, fusion)
        out = {"verification": ijb.verification_11(meta, img_feats, unknown=self.unknown), **dropped}
        if self.has_1n:
            out["identification"] = ijb.identification_1n(meta, img_feats, tie=self.tie)
        return out


class TinyFaceEvaluator:
    """TinyFace rank-1/5/20 identification; ``images``: the aligned images in ``protocol.image_paths`` order."""

    def __init__(self, protocol: tinyface.TinyFaceProtocol, images=None, *, tie: str = "stable",
                 drop_nan: bool = False):
        self.protocol, self.images, self.tie, self.drop_nan = protocol, images, tie, drop_nan

    def run(self, embed_fn: EmbedFn) -> dict:
        feats, norms = embed_fn(_images(self.images))
        return self.score(feats, norms)

    def score(self, features, norms=None, *, where: str = "features") -> dict:
        feats = feature_matrix(features, where, len(self.protocol.image_paths))
        proto, dropped = self.protocol, {}
        bad = bad_rows(feats)
        if bad.size:
            if not self.drop_nan:
                refuse_nan(bad, feats.shape[0], where)
            proto, dropped = tinyface.drop_rows(proto, bad)
            dropped = {"dropped_nan_rows": int(bad.size), **dropped}
        return {"rank": tinyface.evaluate(feats, proto, tie=self.tie), **dropped}


class IJBSEvaluator:
    """IJB-S (the CS6 protocols): per image the raw feature ``e * n`` (no flip test, as the original);
    ``paths`` are the image list's relative paths, ``images`` the images in that order."""

    def __init__(self, protocol: dict, paths: Iterable[str], images=None, *, tie: str = "stable",
                 drop_nan: bool = False):
        self.protocol, self.paths, self.images = protocol, list(paths), images
        self.tie, self.drop_nan = tie, drop_nan

    def run(self, embed_fn: EmbedFn) -> dict:
        feats, norms = embed_fn(_images(self.images))
        return self.score(feats, norms)

    def score(self, features, norms=None, *, where: str = "features") -> dict:
        feats = feature_matrix(features, where, len(self.paths))
        if norms is None:
            raise ProtocolError(f"{where}: missing array 'norms'; IJB-S needs them (raw feature = features * norms)")
        raw = np.asarray(feats, np.float32) * np.asarray(norms, np.float32).reshape(-1, 1)
        paths, dropped = self.paths, {}
        bad = bad_rows(feats, norms)
        if bad.size:
            if not self.drop_nan:
                refuse_nan(bad, feats.shape[0], where)
            keep = np.ones(len(paths), bool)
            keep[bad] = False
            paths, raw = [p for p, k in zip(paths, keep) if k], raw[keep]
            dropped = {"dropped_nan_rows": int(bad.size)}
        return {**ijbs.evaluate(self.protocol, paths, raw, tie=self.tie), **dropped}


# Training evaluators by type (``config.evals.<name>.type``); see the module docstring for what a class provides.
EVALUATORS = {"verification": VerificationEvaluator}
