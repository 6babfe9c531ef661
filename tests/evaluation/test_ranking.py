"""evaluation.ranking: chunked scores keep exact ties, and mate ranks equal a brute-force stable sort."""
import numpy as np
import pytest

from evaluation import ranking
from tests.support.verification_pairs import unit_rows as _unit


def test_identification_scores_keep_exact_ties():
    rng = np.random.default_rng(5)
    g = _unit(rng.normal(size=(40, 32)))
    p = _unit(rng.normal(size=(300, 32)))
    g[31] = g[4]          # gallery copy: the mate (31) ties with a non-mate (4) ranked before it
    p[250] = p[3]         # probe copies in different chunks
    p[7] = g[4]
    seen = {}
    for idx, s in ranking.score_chunks(p, g, chunk=64):
        for k, row in zip(idx, s):
            seen[int(k)] = row
    assert sorted(seen) == list(range(300))
    np.testing.assert_array_equal(seen[250], seen[3])
    for k in range(300):
        assert seen[k][31] == seen[k][4]
    mates = np.zeros((300, 40), bool)
    mates[:, 31] = True
    rk, ms, _ = ranking.mate_ranks_chunked(p, g, lambda idx: mates[idx], tie="stable", chunk=64)
    for k in range(300):  # brute force: per-pair scores, stable descending order, first mate
        s = np.array([np.sum(p[k] * g[j]) for j in range(40)], np.float32)
        first = int(np.flatnonzero(np.argsort(-s, kind="stable") == 31)[0])
        assert rk[k] == first
        assert rk[k] >= 1  # the tied non-mate 4 always comes first
    assert ms[7] == pytest.approx(1.0, abs=1e-6)
