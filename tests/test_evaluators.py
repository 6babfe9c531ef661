"""Evaluators as objects: run(embed_fn) with an injected embedding function gives what the scoring
functions give on the same features; NaN rows are refused or dropped with the pairs that use them."""
import numpy as np
import pytest

from evaluation import ProtocolError, verification
from evaluation.evaluators import VerificationEvaluator


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _fake_set(seed, n_pairs=60, dim=16):
    """Images are stand-ins (row ids); the embed function maps them to features whose genuine pairs
    are close."""
    rs = np.random.RandomState(seed)
    issame = rs.rand(n_pairs) < 0.5
    base = rs.randn(n_pairs, dim)
    other = np.where(issame[:, None], base + 0.4 * rs.randn(n_pairs, dim), rs.randn(n_pairs, dim))
    feats = _unit(np.stack([base, other], axis=1).reshape(-1, dim)).astype(np.float32)
    images = np.arange(2 * n_pairs)
    return images, issame, feats


def test_run_with_an_injected_embed_fn_equals_the_scoring_function():
    sets = {"a": _fake_set(0), "b": _fake_set(1, n_pairs=40)}
    table = {name: feats for name, (_, _, feats) in sets.items()}
    calls = []

    def embed_fn(images):
        calls.append(len(images))
        name = "a" if len(images) == 120 else "b"
        return table[name][images], np.ones((len(images), 1), np.float32)

    evaluator = VerificationEvaluator({k: (images, issame) for k, (images, issame, _) in sets.items()})
    metrics = evaluator.run(embed_fn)
    assert calls == [120, 80]
    for name, (_, issame, feats) in sets.items():
        _, _, acc, thr = verification.evaluate(feats, issame)
        assert metrics["sets"][name]["accuracy"] == float(np.mean(acc))
        assert metrics["sets"][name]["best_threshold"] == float(np.mean(thr))
    assert metrics["mean_accuracy"] == pytest.approx(np.mean([metrics["sets"][k]["accuracy"] for k in sets]))


def test_nan_rows_are_refused_or_dropped_with_their_pairs():
    images, issame, feats = _fake_set(2)
    feats = feats.copy()
    feats[[5, 30]] = np.nan  # pairs 2 and 15
    strict = VerificationEvaluator({"s": (images, issame)})
    with pytest.raises(ProtocolError, match=r"2 of 120 feature rows are NaN/inf \(rows 5, 30\)"):
        strict.score({"s": (feats, None)})
    lenient = VerificationEvaluator({"s": (images, issame)}, drop_nan=True)
    got = lenient.score({"s": (feats, None)})["sets"]["s"]
    keep = np.ones(60, bool)
    keep[[2, 15]] = False
    kept = feats.reshape(60, 2, -1)[keep].reshape(-1, feats.shape[1])
    assert got["accuracy"] == float(np.mean(verification.evaluate(kept, issame[keep])[2]))
    assert got["dropped_nan_rows"] == 2 and got["dropped_pairs"] == 2
