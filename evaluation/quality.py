"""Verification by image quality: does a model hold up on low-quality pairs? (AdaFace, Kim et al. CVPR 2022)

Given per-image features of held-out identities, their identity labels and an image-quality label
(synthetic degradation severity, light direction, ...), every unordered pair of images is a trial and
its quality is the LOWER of its two images' qualities (a pair is as hard as its worse image). Pairs
are split into bins of equal pair count by that quality, and each bin is scored two ways:

* **10-fold accuracy** exactly as the high-quality sets (``evaluation.verification``): a fixed sample of
  ``pairs_per_bin`` pairs, half genuine and half impostor, in a seeded random order;
* **TAR@FAR** over *every* pair of the bin (sklearn ROC, nearest-FPR TAR as the IJB protocol), so small
  FARs are supported by many impostors.

The pair sample and the bins depend only on the labels, the qualities and ``seed``, never on the
features: every model evaluated on the same images is scored on the same pairs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.stats import spearmanr

from evaluation import ProtocolError
from evaluation.ijb import roc_curve, tar_at_far
from evaluation.verification import evaluate


@dataclasses.dataclass(frozen=True)
class QualityPairs:
    """first/second: image indices of every unordered pair (i < j); same: genuine pair; pair_quality:
    min of the two images' qualities; bin: bin index (0 = lowest quality); edges: the bins' pair-quality
    boundaries (num_bins + 1, ascending); sample: per bin, indices into the pairs of the balanced
    10-fold sample (genuine and impostor interleaved in a random order)."""

    first: np.ndarray
    second: np.ndarray
    same: np.ndarray
    pair_quality: np.ndarray
    bin: np.ndarray
    edges: np.ndarray
    sample: tuple


def make_quality_pairs(labels, quality, num_bins: int = 4, pairs_per_bin: int = 600, seed: int = 0) -> QualityPairs:
    """All pairs of the images, binned by pair quality into ``num_bins`` bins of (nearly) equal size,
    with a balanced sample of ``pairs_per_bin`` pairs per bin for the 10-fold protocol."""
    labels = np.asarray(labels).reshape(-1)
    quality = np.asarray(quality, np.float64).reshape(-1)
    if labels.shape != quality.shape:
        raise ProtocolError(f"{labels.size} labels but {quality.size} quality values; expected one per image")
    if not np.isfinite(quality).all():
        raise ProtocolError("quality contains NaN or inf")
    if num_bins < 1 or pairs_per_bin < 20 or pairs_per_bin % 2:
        raise ProtocolError(f"num_bins={num_bins}, pairs_per_bin={pairs_per_bin}: expected num_bins >= 1 and an "
                            "even pairs_per_bin >= 20 (10 folds of genuine and impostor pairs)")
    first, second = np.triu_indices(labels.size, k=1)
    same = labels[first] == labels[second]
    pair_quality = np.minimum(quality[first], quality[second])
    # Equal-count bins by rank (stable, so tied qualities keep the pair order): quantile edges would
    # put all tied pairs of a discrete quality scale (e.g. Yale B's light positions) into one bin.
    order = np.argsort(pair_quality, kind="stable")
    bins = np.empty(order.size, np.int64)
    bins[order] = np.minimum(np.arange(order.size) * num_bins // order.size, num_bins - 1)
    edges = np.array([pair_quality[order[0]]] + [pair_quality[bins == b].max() for b in range(num_bins)])
    rng = np.random.default_rng(seed)
    sample = []
    for b in range(num_bins):
        genuine = np.flatnonzero((bins == b) & same)
        impostor = np.flatnonzero((bins == b) & ~same)
        half = pairs_per_bin // 2
        if genuine.size < half or impostor.size < half:
            raise ProtocolError(f"quality bin {b}: {genuine.size} genuine and {impostor.size} impostor pairs, "
                                f"fewer than the {half} of each that pairs_per_bin={pairs_per_bin} needs; "
                                "use fewer bins or fewer pairs")
        chosen = np.concatenate([rng.choice(genuine, half, replace=False), rng.choice(impostor, half, replace=False)])
        sample.append(chosen[rng.permutation(chosen.size)])
    return QualityPairs(first=first, second=second, same=same, pair_quality=pair_quality, bin=bins, edges=edges,
                        sample=tuple(sample))


def verification_by_quality(features, pairs: QualityPairs, far_targets=(1e-3, 1e-2)) -> list[dict]:
    """Per bin (lowest quality first): {'bin', 'quality_range', 'accuracy' (mean of 10 folds), 'fold_std',
    'tar' {far: TAR over all pairs of the bin}, 'genuine', 'impostor' (pair counts)}."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[0] <= int(max(pairs.first.max(), pairs.second.max())):
        raise ProtocolError(f"features of shape {features.shape} do not cover the {pairs.second.max() + 1} images "
                            "the pairs were made for")
    if not np.isfinite(features).all():
        raise ProtocolError("features contain NaN or inf")
    out = []
    for b, chosen in enumerate(pairs.sample):
        inter = np.empty((2 * chosen.size, features.shape[1]), np.float32)
        inter[0::2], inter[1::2] = features[pairs.first[chosen]], features[pairs.second[chosen]]
        _, _, acc, _ = evaluate(inter, pairs.same[chosen])
        in_bin = np.flatnonzero(pairs.bin == b)
        scores = np.sum(features[pairs.first[in_bin]] * features[pairs.second[in_bin]], axis=1)
        fpr, tpr, _ = roc_curve(pairs.same[in_bin], scores)
        genuine = int(pairs.same[in_bin].sum())
        out.append({"bin": b, "quality_range": (float(pairs.edges[b]), float(pairs.edges[b + 1])),
                    "accuracy": float(acc.mean()), "fold_std": float(acc.std()),
                    "tar": tar_at_far(fpr, tpr, far_targets), "genuine": genuine, "impostor": int(in_bin.size - genuine)})
    return out


def norm_quality_spearman(norms, quality) -> float:
    """Spearman rank correlation between feature norms and image quality (scipy)."""
    norms = np.asarray(norms, np.float64).reshape(-1)
    quality = np.asarray(quality, np.float64).reshape(-1)
    if norms.shape != quality.shape:
        raise ProtocolError(f"{norms.size} norms but {quality.size} quality values")
    return float(spearmanr(norms, quality).statistic)
