"""The study's paired statistics against formulas, enumeration and Monte Carlo."""
import itertools

import numpy as np
import pytest
from scipy import stats as sps
from scipy.stats import rankdata

from adaface_jax.miniature import stats as study_stats


# --- statistics ------------------------------------------------------------------------------------------------

def test_paired_t_against_the_formula():
    d = np.array([0.02, 0.015, -0.004, 0.03, 0.011, 0.007])
    t = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
    out = study_stats.paired_t(d)
    assert out["t"] == pytest.approx(t) and out["p"] == pytest.approx(sps.t.sf(t, d.size - 1)) and out["df"] == 5
    assert study_stats.paired_t([0.01] * 4)["p"] == 0.0 and study_stats.paired_t([0.0] * 4)["p"] == 1.0


def _wilcoxon_by_enumeration(d):
    d = np.asarray(d, float)
    d = d[d != 0]
    ranks = rankdata(np.abs(d))  # mid-ranks for ties
    observed = ranks[d > 0].sum()
    count = sum(ranks[np.array(signs) > 0].sum() >= observed - 1e-9 for signs in itertools.product([1, -1],
                                                                                                   repeat=d.size))
    return observed, count / 2 ** d.size


@pytest.mark.parametrize("d", [[0.02, 0.015, -0.004, 0.03, 0.011, 0.007],
                               [0.01, 0.02, 0.02, -0.01, 0.03, 0.01, 0.005]])  # the second has ties
def test_exact_wilcoxon_against_enumerating_every_sign(d):
    observed, p = _wilcoxon_by_enumeration(d)
    out = study_stats.wilcoxon_exact(d)
    assert out["statistic"] == pytest.approx(observed) and out["p"] == pytest.approx(p)


def test_minimum_detectable_effect_has_the_power_it_claims():
    sd, n, alpha = 0.02, 6, 0.05
    mde = study_stats.minimum_detectable_effect(sd, n, alpha, 0.8)
    r = np.random.default_rng(0)
    d = r.normal(mde, sd, (40_000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / np.sqrt(n))
    assert np.mean(t > sps.t.ppf(1 - alpha, n - 1)) == pytest.approx(0.8, abs=0.01)  # Monte Carlo power
    assert 0.02 < mde < 0.04  # about (t_.95 + t_.80) sd / sqrt(n) = 2.9 sd / 2.45


def test_bootstrap_resamples_seeds_and_identities():
    x = np.full((5, 30), 0.04)
    b = study_stats.bootstrap(x, 300)
    assert b["low"] == pytest.approx(0.04) and b["high"] == pytest.approx(0.04)
    r = np.random.default_rng(0)
    seeds_only = r.normal(0, 0.03, (6, 1)) + np.zeros((6, 40))  # all spread between seeds
    ids_only = np.zeros((6, 1)) + r.normal(0, 0.03, (1, 40))    # all spread between identities
    for grid, values in ((seeds_only, seeds_only[:, 0]), (ids_only, ids_only[0])):
        out = study_stats.bootstrap(grid, 4000, seed=1)
        se = values.std() / np.sqrt(values.size)  # the plug-in standard error of the mean over that level
        assert (out["high"] - out["low"]) == pytest.approx(2 * 1.96 * se, rel=0.2)
        assert out["low"] <= out["lower_bound"] <= out["mean"] <= out["high"]
