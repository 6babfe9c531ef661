"""The study's statistics: paired comparisons of two arms over seeds (same initialisation and batches per
seed), with a one-sided paired t-test, an exact Wilcoxon signed-rank test, a bootstrap over seeds and test
identities, and the smallest effect the design could detect."""
from __future__ import annotations

import numpy as np
from scipy import optimize, stats


def paired_t(differences, alternative: str = "greater") -> dict:
    """One-sample t-test of the paired differences against 0: {'t', 'df', 'p'} (p one-sided for 'greater'). When
    every difference is the same, p is 0 if it favours the alternative and 1 otherwise."""
    d = np.asarray(differences, np.float64)
    if np.all(d == d[0]):  # no spread: t is undefined; the sign of the difference decides
        better = d[0] > 0 if alternative == "greater" else d[0] < 0
        return {"t": float("inf") if d[0] else 0.0, "df": int(d.size - 1), "p": 0.0 if better else 1.0}
    res = stats.ttest_1samp(d, 0.0, alternative=alternative)
    return {"t": float(res.statistic), "df": int(d.size - 1), "p": float(res.pvalue)}


def wilcoxon_exact(differences, alternative: str = "greater") -> dict:
    """Wilcoxon signed-rank test on its exact null distribution, every one of the 2**n sign assignments
    enumerated (scipy's permutation method), so ties and zeros need no normal approximation:
    {'statistic' (sum of the positive ranks), 'p'}."""
    d = np.asarray(differences, np.float64)
    if np.all(d == 0):
        return {"statistic": 0.0, "p": 1.0}
    res = stats.wilcoxon(d, alternative=alternative, method=stats.PermutationMethod(n_resamples=2 ** d.size))
    return {"statistic": float(res.statistic), "p": float(res.pvalue)}


def bootstrap(per_seed_identity, resamples: int, alpha: float = 0.05, seed: int = 0) -> dict:
    """Two-level bootstrap of the mean of a (seeds, identities) array of paired differences: seeds and test
    identities are resampled independently, with replacement. {'mean', 'low', 'high' (the 95% percentile
    interval), 'lower_bound' (the one-sided bound at ``alpha``)}."""
    x = np.asarray(per_seed_identity, np.float64)
    n_seeds, n_ids = x.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for b in range(resamples):
        means[b] = x[rng.integers(0, n_seeds, n_seeds)][:, rng.integers(0, n_ids, n_ids)].mean()
    return {"mean": float(x.mean()), "low": float(np.quantile(means, 0.025)), "high": float(np.quantile(means, 0.975)),
            "lower_bound": float(np.quantile(means, alpha))}


def power_paired_t(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the one-sided paired t-test at level ``alpha`` with ``n`` pairs when the mean difference is
    ``effect`` and its sd ``sd`` (noncentral t)."""
    df = n - 1
    critical = stats.t.ppf(1.0 - alpha, df)
    return float(stats.nct.sf(critical, df, effect * np.sqrt(n) / sd))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest mean paired difference the one-sided paired t-test detects with ``power`` (nan when sd is 0
    or there are fewer than 2 pairs)."""
    if n < 2 or not sd > 0:
        return float("nan")
    return float(optimize.brentq(lambda e: power_paired_t(e, sd, n, alpha) - power, 1e-12 * sd, 100.0 * sd))


def compare(a_by_seed: dict, b_by_seed: dict, *, alpha: float, power: float, per_identity_a=None,
            per_identity_b=None, resamples: int = 2000) -> dict:
    """Arm A minus arm B over the seeds both have: the per-seed differences, their mean and sd, the paired
    t-test and exact Wilcoxon test (one-sided, A > B), the minimum detectable effect, and the bootstrap
    interval (over seeds and identities when per-identity values {seed: array} are given, else over seeds)."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed), key=int)
    d = np.array([a_by_seed[s] - b_by_seed[s] for s in seeds], np.float64)
    out = {"seeds": [int(s) for s in seeds], "differences": d.tolist(), "mean": float(d.mean()) if d.size else None}
    if d.size < 2:
        return out
    sd = float(d.std(ddof=1))
    out.update(sd=sd, t_test=paired_t(d), wilcoxon=wilcoxon_exact(d), power=power,
               mde=minimum_detectable_effect(sd, d.size, alpha, power))
    if per_identity_a is not None:
        grid = np.stack([np.asarray(per_identity_a[s], np.float64) - np.asarray(per_identity_b[s], np.float64)
                         for s in seeds])
    else:
        grid = d[:, None]
    out["bootstrap"] = bootstrap(grid, resamples, alpha)
    return out
