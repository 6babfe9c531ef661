"""High-quality verification sets (LFW, CFP-FP, CPLFW, CALFW, AgeDB-30): 10-fold accuracy.

Reproduces the reference ``evaluate_utils.evaluate`` (``calculate_roc``, ``calculate_accuracy``) exactly, vectorized:

* ``dist = sum((e1 - e2)**2)`` in the embeddings' dtype (float32 for float32 features);
* thresholds ``np.arange(0, 4, 0.01)``; "same" iff ``dist < thr`` (strict, compared in float64
  exactly like numpy compares a float32 array with a float64 scalar);
* contiguous folds (sklearn ``KFold(shuffle=False)``: the first ``n % k`` folds are one larger);
* per fold the best threshold is the FIRST maximum of the train accuracy (smallest threshold).

Instead of evaluating every threshold on every fold, each pair is binned once by
``searchsorted(thresholds, dist, 'right')`` (the first threshold that accepts it); cumulative
per-(fold, class) histograms then give the accepted counts for all thresholds at once.
"""
from __future__ import annotations

import numpy as np

from evaluation import ProtocolError

# The five sets' file stems (<name>.bin), in the original's order (FiveValidationDataset: agedb_30, cfp_fp, lfw,
# cplfw, calfw).
HQ_SETS = ("agedb_30", "cfp_fp", "lfw", "cplfw", "calfw")
THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


def fold_slices(n: int, nrof_folds: int) -> list[slice]:
    """Contiguous KFold(shuffle=False) test blocks: the first ``n % k`` folds get one extra item."""
    if nrof_folds < 2 or n < nrof_folds:
        raise ProtocolError(f"need at least {nrof_folds} pairs for {nrof_folds} folds (got {n}); nrof_folds >= 2")
    sizes = np.full(nrof_folds, n // nrof_folds, dtype=np.int64)
    sizes[: n % nrof_folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def pair_distances(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
    """Squared L2 distance per pair in the inputs' dtype (the reference's float32 arithmetic)."""
    embeddings1 = np.asarray(embeddings1)
    embeddings2 = np.asarray(embeddings2)
    if embeddings1.shape != embeddings2.shape or embeddings1.ndim != 2:
        raise ProtocolError(f"embedding sides must both be (N, D); got {embeddings1.shape} and {embeddings2.shape}")
    return np.sum(np.square(np.subtract(embeddings1, embeddings2)), 1)


def _check_pair_count(dist, issame) -> int:
    """The reference truncates to ``min(len(issame), len(dist))``; a mismatch is an error here."""
    if len(issame) != dist.shape[0]:
        raise ProtocolError(f"{dist.shape[0]} pairs of embeddings but {len(issame)} issame labels; "
                            "expected one label per pair")
    return int(dist.shape[0])


def _split_pairs(embeddings, actual_issame):
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] % 2:
        raise ProtocolError(f"embeddings must be (2N, D) with pairs interleaved; got shape {embeddings.shape}")
    issame = np.asarray(actual_issame).astype(bool).reshape(-1)
    return embeddings[0::2], embeddings[1::2], issame


def _accepted_counts(dist, issame, folds, thresholds):
    """accepted[f, c, t] = #pairs of fold f, class c (0 diff, 1 same) with ``dist < thresholds[t]``."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1 or np.any(np.diff(thresholds) < 0):
        raise ProtocolError("thresholds must be a 1-D ascending array")
    nt = thresholds.size
    fold_of = np.empty(dist.shape[0], dtype=np.int64)
    for f, s in enumerate(folds):
        fold_of[s] = f
    # First threshold index that accepts the pair: thr > dist. NaN sorts last -> never accepted.
    first = np.searchsorted(thresholds, dist.astype(np.float64), side="right")
    flat = (fold_of * 2 + issame.astype(np.int64)) * (nt + 1) + first
    hist = np.bincount(flat, minlength=len(folds) * 2 * (nt + 1)).reshape(len(folds), 2, nt + 1)
    accepted = np.cumsum(hist, axis=2)[:, :, :nt]
    class_sizes = hist.sum(axis=2)  # (F, 2)
    return accepted, class_sizes


def _safe_ratio(num, den):
    den_safe = np.where(den == 0, 1, den)
    return np.where(den == 0, 0.0, num / den_safe)


def calculate_roc(thresholds, embeddings1, embeddings2, actual_issame, nrof_folds=10):
    """Reference ``calculate_roc`` (pca=0): ``(tpr (T,), fpr (T,), accuracy (F,), best_thresholds (F,))``."""
    thresholds = np.asarray(thresholds)
    dist = pair_distances(embeddings1, embeddings2)
    issame = np.asarray(actual_issame).astype(bool).reshape(-1)
    nrof_pairs = _check_pair_count(dist, issame)
    folds = fold_slices(nrof_pairs, nrof_folds)
    accepted, sizes = _accepted_counts(dist, issame, folds, thresholds)
    fp, tp = accepted[:, 0], accepted[:, 1]                 # (F, T)
    n_diff, n_same = sizes[:, 0:1], sizes[:, 1:2]           # (F, 1)
    tn, fn = n_diff - fp, n_same - tp
    n_fold = n_diff + n_same
    # Train split = all folds but f: totals minus the fold's own counts.
    tp_train, tn_train = tp.sum(0) - tp, tn.sum(0) - tn
    acc_train = (tp_train + tn_train) / (nrof_pairs - n_fold)
    best_idx = np.argmax(acc_train, axis=1)                 # first maximum = smallest threshold
    rows = np.arange(len(folds))
    accuracy = (tp[rows, best_idx] + tn[rows, best_idx]) / n_fold[:, 0]
    tprs = _safe_ratio(tp, tp + fn)
    fprs = _safe_ratio(fp, fp + tn)
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy.astype(np.float64), thresholds[best_idx]


def evaluate(embeddings, actual_issame, nrof_folds=10):
    """Reference entry point: interleaved pair embeddings -> ``(tpr, fpr, accuracy, best_thresholds)``.

    ``embeddings[0::2]`` vs ``embeddings[1::2]`` with ``actual_issame`` per pair. Report
    ``accuracy.mean()`` and ``best_thresholds.mean()`` like the reference.
    """
    emb1, emb2, issame = _split_pairs(embeddings, actual_issame)
    return calculate_roc(THRESHOLDS, emb1, emb2, issame, nrof_folds=nrof_folds)


# ----------------------------------------------------------------------------------------------
# TAR@FAR (InsightFace's calculate_val / calculate_val_far; never called by AdaFace: a documented extra)


def slinear_threshold(far_train: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """Old-SciPy ``interp1d(far_train, thresholds, kind='slinear')(far_target)`` on tied FARs.

    ``far_train`` is non-decreasing. Interpolates between the LAST threshold of the largest FAR
    below the target and the FIRST threshold of the smallest FAR above it; an exact hit on a
    tied FAR returns the largest threshold of that tie group.
    """
    far_train = np.asarray(far_train, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    exact = np.flatnonzero(far_train == far_target)
    if exact.size:
        return float(thresholds[exact[-1]])
    below = np.flatnonzero(far_train < far_target)
    above = np.flatnonzero(far_train > far_target)
    if below.size == 0 or above.size == 0:
        raise ProtocolError(f"far_target {far_target} outside the FAR range [{far_train.min()}, {far_train.max()}]")
    lo_val = far_train[below].max()
    hi_val = far_train[above].min()
    i_lo = np.flatnonzero(far_train == lo_val)[-1]
    i_hi = np.flatnonzero(far_train == hi_val)[0]
    t_lo, t_hi = thresholds[i_lo], thresholds[i_hi]
    return float(t_lo + (far_target - lo_val) * (t_hi - t_lo) / (hi_val - lo_val))


def calculate_val(thresholds, embeddings1, embeddings2, actual_issame, far_target, nrof_folds=10):
    """``(val_mean, val_std, far_mean)``: TAR at the train-fold threshold reaching ``far_target``."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    dist = pair_distances(embeddings1, embeddings2)
    issame = np.asarray(actual_issame).astype(bool).reshape(-1)
    nrof_pairs = _check_pair_count(dist, issame)
    folds = fold_slices(nrof_pairs, nrof_folds)
    accepted, sizes = _accepted_counts(dist, issame, folds, thresholds)
    fa_all, n_diff_all = accepted[:, 0].sum(0), sizes[:, 0].sum()
    val, far = np.zeros(len(folds)), np.zeros(len(folds))
    dist64 = dist.astype(np.float64)
    for f, s in enumerate(folds):  # loop over folds only; thresholds are vectorized
        n_diff_train = n_diff_all - sizes[f, 0]
        if n_diff_train == 0:
            raise ZeroDivisionError(f"fold {f}: no different-identity pairs in the train split")
        far_train = (fa_all - accepted[f, 0]) / n_diff_train
        thr = slinear_threshold(far_train, thresholds, far_target) if far_train.max() >= far_target else 0.0
        accept = dist64[s] < thr
        same = issame[s]
        if same.sum() == 0 or (~same).sum() == 0:
            raise ZeroDivisionError(f"fold {f}: test split lacks same or different pairs")
        val[f] = np.sum(accept & same) / np.sum(same)
        far[f] = np.sum(accept & ~same) / np.sum(~same)
    return float(np.mean(val)), float(np.std(val)), float(np.mean(far))


def evaluate_tar_far(embeddings, actual_issame, far_target=1e-3, nrof_folds=10, thresholds=VAL_THRESHOLDS):
    """InsightFace-style TAR@FAR on interleaved pair embeddings: ``(val_mean, val_std, far_mean)``."""
    emb1, emb2, issame = _split_pairs(embeddings, actual_issame)
    return calculate_val(thresholds, emb1, emb2, issame, far_target, nrof_folds=nrof_folds)


def summarize(name: str, embeddings, actual_issame, nrof_folds=10) -> dict:
    """The reference's logged numbers for one set (+ TAR@FAR=1e-3 as an extra); ``roc`` holds the
    fold-mean ``(fpr, tpr)`` arrays."""
    tpr, fpr, accuracy, best_thresholds = evaluate(embeddings, actual_issame, nrof_folds)
    out = {
        "name": name,
        "roc": (fpr, tpr),
        "accuracy": float(accuracy.mean()),
        "accuracy_std": float(accuracy.std()),
        "best_threshold": float(best_thresholds.mean()),
        "num_samples": int(np.asarray(embeddings).shape[0]),
    }
    try:
        val, val_std, far = evaluate_tar_far(embeddings, actual_issame, 1e-3, nrof_folds)
        out.update({"tar@far=1e-3": val, "tar_std": val_std, "far": far})
    except (ValueError, ZeroDivisionError):
        out.update({"tar@far=1e-3": float("nan"), "tar_std": float("nan"), "far": float("nan")})
    return out
