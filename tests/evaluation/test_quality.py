"""evaluation.quality: rank-1, one-threshold TAR and Spearman against brute force and scipy."""
import numpy as np
import pytest
from scipy.stats import rankdata

from evaluation import ProtocolError
from evaluation.quality import one_threshold_tar, quality_spearman, rank1_correct


# --- evaluation.quality -----------------------------------------------------------------------------------

def _held_out(num_ids=8, probes=5, dim=6, seed=0):
    r = np.random.default_rng(seed)
    centres = r.normal(size=(num_ids, dim))
    gallery = centres + 0.3 * r.normal(size=centres.shape)
    labels = np.repeat(np.arange(num_ids), probes)
    noise = np.where(np.arange(labels.size) % probes < 3, 1.5, 0.2)[:, None]  # 3 hard probes, 2 easy, per id
    probe = centres[labels] + noise * r.normal(size=(labels.size, dim))
    groups = np.where(np.arange(labels.size) % probes < 3, "degraded", "clean")
    return probe, labels, groups, gallery, np.arange(num_ids)


def test_rank1_is_the_nearest_gallery_image_by_brute_force():
    probe, labels, _, gallery, g_labels = _held_out()
    got = rank1_correct(probe, labels, gallery, g_labels)
    for i in range(len(labels)):
        cos = [probe[i] @ g / np.linalg.norm(probe[i]) / np.linalg.norm(g) for g in gallery]
        assert got[i] == (g_labels[int(np.argmax(cos))] == labels[i])
    assert 0 < got.sum() < len(got)
    with pytest.raises(ProtocolError, match="have no gallery image"):
        rank1_correct(probe, labels + 1, gallery, g_labels)


def test_one_threshold_tar_is_the_best_tar_any_threshold_gives_at_that_far():
    probe, labels, groups, gallery, g_labels = _held_out(num_ids=12, probes=6)
    far = 0.05
    out = one_threshold_tar(probe, labels, groups, gallery, g_labels, far)
    p = probe / np.linalg.norm(probe, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    pairs = [(float(p[i] @ g[j]), labels[i] == g_labels[j], groups[i]) for i in range(len(p)) for j in range(len(g))]
    impostors = np.array([sc for sc, same, _ in pairs if not same])
    best = None  # brute force: the lowest threshold among all scores whose impostor FAR is within far
    for t in sorted({sc for sc, _, _ in pairs}):
        if np.mean(impostors > t) <= far:
            best = t
            break
    assert out["threshold"] == pytest.approx(best) and out["far"] <= far
    for group in ("degraded", "clean"):
        genuine = [sc for sc, same, gr in pairs if same and gr == group]
        assert out["tar"][group] == pytest.approx(np.mean(np.array(genuine) > best))
    assert out["tar"]["degraded"] < out["tar"]["clean"]  # one threshold: the noisy probes pass it less often
    with pytest.raises(ProtocolError, match="false accept rate"):
        one_threshold_tar(probe, labels, groups, gallery, g_labels, 0.0)


def test_quality_spearman_is_pearson_of_ranks_and_errors_name_the_problem():
    r = np.random.default_rng(0)
    x, y = r.normal(size=50), r.normal(size=50)
    y[:10] = y[10:20]  # ties
    assert quality_spearman(x, y) == pytest.approx(np.corrcoef(rankdata(x), rankdata(y))[0, 1], abs=1e-12)
    with pytest.raises(ProtocolError, match="quality values"):
        quality_spearman(x, y[:-1])
    bad = np.ones((3, 4))
    bad[0, 0] = np.nan
    with pytest.raises(ProtocolError, match="NaN"):
        rank1_correct(bad, [0, 1, 2], np.ones((3, 4)), [0, 1, 2])
