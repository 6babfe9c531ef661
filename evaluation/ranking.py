"""Identification metrics shared by IJB-B/C 1:N, IJB-S and TinyFace (pure numpy).

Ranking uses a *stable* descending order: among equal scores the lower gallery index comes
first (``tie="stable"``). ``tie="reversed"`` gives the order of ``argsort(score)[:, ::-1]`` with a
stable sort (higher index first), the closest reproducible stand-in for the reference's
``argsort`` reversals (numpy's default quicksort has unspecified tie order).
Ranks are computed without sorting rows: the position of the best mate is the number of
entries ranked before it, counted in probe chunks to bound memory. NaN scores rank last
(treated as -inf). Scores come from :func:`score_chunks`, which scores bit-identical probe or
gallery rows once, so identical templates tie exactly wherever they stand.
"""
from __future__ import annotations

import hashlib

import numpy as np

from evaluation import ProtocolError

TIES = ("stable", "reversed")


def _row_stats(scores, is_mate, tie):
    """(rank of the first mate or -1, best mate score or nan, max non-mate score) per row."""
    if tie not in TIES:
        raise ProtocolError(f"tie must be one of {TIES}, got {tie!r}")
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


def _unique_rows(x):
    """(unique rows in first-occurrence order, inverse): bit-identical rows share one row; without
    duplicates the rows come back as given with an identity inverse."""
    x = np.ascontiguousarray(x)
    if x.shape[0] == 0:
        return x, np.zeros(0, np.int64)
    flat = x.reshape(x.shape[0], -1)
    first: dict[bytes, int] = {}  # 128-bit digest of the row's bytes -> unique index
    inv = np.fromiter((first.setdefault(hashlib.blake2b(row, digest_size=16).digest(), len(first))
                       for row in flat), np.int64, x.shape[0])
    if len(first) == x.shape[0]:
        return x, inv
    first_row = np.unique(inv, return_index=True)[1]
    if not np.array_equal(flat.view(np.uint8), flat[first_row[inv]].view(np.uint8)):
        raise AssertionError("row digest collision")  # 2**-128: never in practice
    return x[first_row], inv


def score_chunks(probe_feats, gallery_feats, chunk=4096):
    """Yield ``(probe_indices, scores (len, G))`` covering every probe once, ``scores = probe @ gallery.T``.

    Bit-identical probe rows and bit-identical gallery rows are scored ONCE (duplicates get copies
    of that one value), so identical templates get bit-identical scores wherever they stand; a
    plain blocked product could sum them in position-dependent BLAS orders and split exact ties.
    Without duplicates this is the plain chunked product in input order.
    """
    p_u, p_inv = _unique_rows(probe_feats)
    g_u, g_inv = _unique_rows(gallery_feats)
    g_dups = g_u.shape[0] != g_inv.size
    if p_u.shape[0] == p_inv.size:  # no duplicate probes: contiguous chunks
        order, bounds = None, None
    else:
        order = np.argsort(p_inv, kind="stable")
        bounds = np.searchsorted(p_inv[order], np.arange(0, p_u.shape[0] + chunk, chunk))
    for k, ua in enumerate(range(0, p_u.shape[0], chunk)):
        s = p_u[ua:ua + chunk] @ g_u.T
        if g_dups:
            s = s[:, g_inv]
        if order is None:
            yield np.arange(ua, ua + s.shape[0]), s
        else:
            sel = order[bounds[k]:bounds[k + 1]]
            yield sel, s[p_inv[sel] - ua]


def mate_ranks_chunked(probe_feats, gallery_feats, is_mate_fn, tie="stable", chunk=4096):
    """Best-mate ranks and best-mate scores for ``probe_feats @ gallery_feats.T`` computed in chunks.

    ``is_mate_fn(idx) -> bool (len(idx), G)`` gives the mate mask of the probes ``idx`` (an index
    array). Scores come from :func:`score_chunks` (identical rows -> bit-identical scores).
    Returns ``(ranks (P,), mate_scores (P,), max_nonmate_scores (P,))``; for a probe without a
    mate, ``max_nonmate_scores`` is its maximum over the whole gallery.
    """
    n = probe_feats.shape[0]
    ranks = np.empty(n, np.int64)
    mate_scores = np.empty(n, np.float64)
    max_nonmate = np.empty(n, np.float64)
    for idx, s in score_chunks(probe_feats, gallery_feats, chunk):
        ranks[idx], mate_scores[idx], max_nonmate[idx] = _row_stats(s, is_mate_fn(idx), tie)
    return ranks, mate_scores, max_nonmate


def cmc(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
    """Fraction of mated probes (rank >= 0) whose first mate is within the top k."""
    mated = ranks[ranks >= 0]
    if mated.size == 0:
        raise ProtocolError("no probe has a mate in the gallery")
    return {int(k): float(np.mean(mated < k)) for k in ks}


def open_set_dir(mate_rank: np.ndarray, mate_score: np.ndarray, nonmated_max: np.ndarray,
                 fars=(0.01, 0.1), eps: float = 1e-8) -> dict[float, float]:
    """PFE ``DIR_FAR`` open set (IJB-S): threshold from non-mated probes' max scores.

    ``k = floor(N_nm * far)``; ``thr = m_sorted[k-1]`` (descending) or ``m_sorted[0] + eps`` when
    ``k == 0``; DIR = mean over mated probes of ``mate is rank-1 and mate score >= thr``.
    """
    if nonmated_max.size == 0:
        raise ProtocolError("gallery has no non-mated probe: FPIR undefined")
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
        raise ProtocolError("gallery has no non-mated probe: FPIR undefined")
    m_sorted = np.sort(nonmated_max, kind="stable")[::-1]
    out = {}
    for fpir in fpirs:
        thr = m_sorted[max(int(nonmated_max.size * fpir) - 1, 0)]
        out[float(fpir)] = float(np.mean((mate_score > mate_max_nonmate) & (mate_score > thr)))
    return out
