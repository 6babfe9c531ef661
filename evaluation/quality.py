"""Held-out identities scored by image quality: does a model hold up on low-quality probes? (AdaFace, Kim et
al. CVPR 2022; the scoring of ``adaface-jax miniature``.)

A gallery holds clean images of held-out identities; each identity also has probes, some degraded and some
clean. Features are unit vectors and the score of a pair is their cosine.

* **Rank-1 identification**: a probe is correct when the most similar gallery image is of its identity.
* **TAR at one threshold**: every probe-gallery pair is a trial. ONE threshold is set on all impostor pairs
  together, at the false accept rate asked for, and each probe group's TAR (degraded, clean) is read at it.
  A threshold per group would let a hard group set a lower bar for itself.
* **Spearman correlation** of a per-image value (feature norm, probability of the true class) with quality.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from evaluation import ProtocolError


def _unit_features(features, what: str) -> np.ndarray:
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ProtocolError(f"{what}: features of shape {f.shape}; expected (images, dimensions)")
    if not np.isfinite(f).all():
        raise ProtocolError(f"{what}: features contain NaN or inf")
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _check_labels(features, labels, what: str) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.size != features.shape[0]:
        raise ProtocolError(f"{what}: {features.shape[0]} images but {labels.size} labels")
    return labels


def similarity(probe_feats, gallery_feats) -> np.ndarray:
    """(probes, gallery) cosine similarities of unit-normalised features."""
    return _unit_features(probe_feats, "probes") @ _unit_features(gallery_feats, "gallery").T


def rank1_correct(probe_feats, probe_labels, gallery_feats, gallery_labels) -> np.ndarray:
    """Per probe: True when its most similar gallery image has its label (the first such image on a tie)."""
    scores = similarity(probe_feats, gallery_feats)
    probe_labels = _check_labels(scores, probe_labels, "probes")
    gallery_labels = _check_labels(scores.T, gallery_labels, "gallery")
    missing = np.setdiff1d(probe_labels, gallery_labels)
    if missing.size:
        raise ProtocolError(f"probes of {missing.size} identities (e.g. {missing[0]}) have no gallery image")
    return gallery_labels[np.argmax(scores, axis=1)] == probe_labels


def one_threshold_tar(probe_feats, probe_labels, probe_groups, gallery_feats, gallery_labels, far: float) -> dict:
    """TAR of each probe group at ONE threshold set on every impostor probe-gallery pair.

    The threshold is the smallest score that at most ``far`` of the impostor pairs exceed; a pair is accepted
    when its score is above it. Returns {'threshold', 'far' (achieved over all impostors), 'tar' {group: TAR
    of that group's genuine pairs}, 'impostor_far' {group: that group's own impostor FAR at the threshold}}."""
    if not 0.0 < far < 1.0:
        raise ProtocolError(f"far={far}: expected a false accept rate in (0, 1)")
    scores = similarity(probe_feats, gallery_feats)
    probe_labels = _check_labels(scores, probe_labels, "probes")
    gallery_labels = _check_labels(scores.T, gallery_labels, "gallery")
    probe_groups = np.asarray(probe_groups).reshape(-1)
    if probe_groups.size != probe_labels.size:
        raise ProtocolError(f"{probe_labels.size} probes but {probe_groups.size} group names")
    genuine = probe_labels[:, None] == gallery_labels[None, :]
    impostor_scores = np.sort(scores[~genuine])[::-1]
    if impostor_scores.size == 0 or not genuine.any():
        raise ProtocolError("the probes and the gallery make no genuine or no impostor pair")
    k = int(np.floor(far * impostor_scores.size))  # at most k impostors may score above the threshold
    threshold = float(impostor_scores[min(k, impostor_scores.size - 1)])
    accepted = scores > threshold
    out = {"threshold": threshold, "far": float(accepted[~genuine].mean()), "tar": {}, "impostor_far": {}}
    for group in dict.fromkeys(probe_groups.tolist()):
        rows = probe_groups == group
        out["tar"][group] = float(accepted[rows][genuine[rows]].mean())
        out["impostor_far"][group] = float(accepted[rows][~genuine[rows]].mean())
    return out


def quality_spearman(values, quality) -> float:
    """Spearman rank correlation between a per-image value and image quality (scipy; ties get mean ranks)."""
    values = np.asarray(values, np.float64).reshape(-1)
    quality = np.asarray(quality, np.float64).reshape(-1)
    if values.shape != quality.shape:
        raise ProtocolError(f"{values.size} values but {quality.size} quality values")
    return float(spearmanr(values, quality).statistic)
