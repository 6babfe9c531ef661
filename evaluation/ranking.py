"""Identification metrics shared by IJB-B/C 1:N, IJB-S and TinyFace (pure numpy).

Ranking uses a *stable* descending order: among equal scores the lower gallery index comes
first (``tie="stable"``). ``tie="reversed"`` gives the order of ``argsort(score)[:, ::-1]`` with a
stable sort (higher index first), the closest reproducible stand-in for the reference's
``argsort`` reversals (numpy's default quicksort has unspecified tie order, §7.35).
Ranks are computed without sorting rows: the position of the best mate is the number of
entries ranked before it, counted in probe chunks to bound memory. NaN scores rank last
(treated as -inf).
"""
from __future__ import annotations

import numpy as np

TIES = ("stable", "reversed")


def _row_stats(scores, is_mate, tie):
    """(rank of the first mate or -1, best mate score or nan, max non-mate score) per row."""
    if tie not in TIES:
        raise ValueError(f"tie must be one of {TIES}, got {tie!r}")
    s = np.asarray(scores)
    if np.isnan(s).any():
        s = np.where(np.isnan(s), -np.inf, s)
    is_mate = np.asarray(is_mate, bool)
    has_mate = is_mate.any(axis=1)
    neg_inf = np.array(-np.inf, s.dtype)
    max_nonmate = np.where(is_mate, neg_inf, s).max(axis=1, initial=-np.inf)
    if not has_mate.any():
        n = s.shape[0]
        return np.full(n, -1, np.int64), np.full(n, np.nan), max_nonmate
    best = np.where(is_mate, s, neg_inf).max(axis=1, initial=-np.inf)
    at_best = s == best[:, None]
    cols = np.arange(s.shape[1])
    if tie == "stable":
        j_best = np.where(is_mate & at_best, cols, s.shape[1]).min(axis=1)
        before_tied = at_best & (cols[None, :] < j_best[:, None])
    else:
        j_best = np.where(is_mate & at_best, cols, -1).max(axis=1)
        before_tied = at_best & (cols[None, :] > j_best[:, None])
    rank = np.count_nonzero(s > best[:, None], axis=1) + np.count_nonzero(before_tied, axis=1)
    return np.where(has_mate, rank, -1), np.where(has_mate, best, np.nan), max_nonmate


def best_mate_rank(scores: np.ndarray, is_mate: np.ndarray, tie: str = "stable") -> np.ndarray:
    """0-based position of the first mate in each row's descending order; -1 for rows without mates."""
    return _row_stats(scores, is_mate, tie)[0]


def mate_ranks_chunked(probe_feats, gallery_feats, is_mate_fn, tie="stable", chunk=4096):
    """Best-mate ranks and best-mate scores for ``probe_feats @ gallery_feats.T`` computed in chunks.

    ``is_mate_fn(start, stop) -> bool (stop-start, G)`` gives the mate mask of a probe chunk.
    Returns ``(ranks (P,), mate_scores (P,), max_nonmate_scores (P,))``; for a probe without a
    mate, ``max_nonmate_scores`` is its maximum over the whole gallery.
    """
    n = probe_feats.shape[0]
    ranks = np.empty(n, np.int64)
    mate_scores = np.empty(n, np.float64)
    max_nonmate = np.empty(n, np.float64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s = probe_feats[start:stop] @ gallery_feats.T
        ranks[start:stop], mate_scores[start:stop], max_nonmate[start:stop] = _row_stats(
            s, is_mate_fn(start, stop), tie)
    return ranks, mate_scores, max_nonmate


def cmc(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
    """Fraction of mated probes (rank >= 0) whose first mate is within the top k."""
    mated = ranks[ranks >= 0]
    if mated.size == 0:
        raise ValueError("no probe has a mate in the gallery")
    return {int(k): float(np.mean(mated < k)) for k in ks}


def open_set_dir(mate_rank: np.ndarray, mate_score: np.ndarray, nonmated_max: np.ndarray,
                 fars=(0.01, 0.1), eps: float = 1e-8) -> dict[float, float]:
    """PFE ``DIR_FAR`` open set (IJB-S): threshold from non-mated probes' max scores.

    ``k = floor(N_nm * far)``; ``thr = m_sorted[k-1]`` (descending) or ``m_sorted[0] + eps`` when
    ``k == 0``; DIR = mean over mated probes of ``mate is rank-1 and mate score >= thr``.
    """
    if nonmated_max.size == 0:
        raise ValueError("gallery has no non-mated probe: FPIR undefined")
    if mate_rank.size == 0:  # the reference's mean over an empty set
        return {float(f): float("nan") for f in fars}
    m_sorted = np.sort(nonmated_max, kind="stable")[::-1]
    out = {}
    for far in fars:
        k = int(nonmated_max.size * far)
        thr = m_sorted[0] + eps if k == 0 else m_sorted[k - 1]
        out[float(far)] = float(np.mean((mate_rank == 0) & (mate_score >= thr)))
    return out


def standard_tpir_fpir(mate_score, mate_max_nonmate, nonmated_max, fpirs=(0.01, 0.1)) -> dict[float, float]:
    """InsightFace ``evaluation_1N`` (standard, per gallery): threshold = descending sorted
    non-mated probes' max scores at ``max(int(N_nm*fpir)-1, 0)``; a mated probe counts when its
    mate score is ``> max(non-mate scores)`` of its row and ``> thr``."""
    if nonmated_max.size == 0:
        raise ValueError("gallery has no non-mated probe: FPIR undefined")
    m_sorted = np.sort(nonmated_max, kind="stable")[::-1]
    out = {}
    for fpir in fpirs:
        thr = m_sorted[max(int(nonmated_max.size * fpir) - 1, 0)]
        out[float(fpir)] = float(np.mean((mate_score > mate_max_nonmate) & (mate_score > thr)))
    return out
