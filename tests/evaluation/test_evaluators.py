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


def _write_bin(path, n_pairs, seed):
    """A .bin of ``n_pairs`` pairs of 112x112 PNGs whose pixel (0, 0) holds the row number (to trace rows)."""
    import cv2  # noqa: PLC0415

    from data_pipeline.bin_reader import write_bin  # noqa: PLC0415
    rs = np.random.RandomState(seed)
    images = []
    for row in range(2 * n_pairs):
        img = rs.randint(0, 255, (112, 112, 3)).astype(np.uint8)
        img[0, 0] = row
        images.append(cv2.imencode(".png", img)[1].tobytes())
    issame = rs.rand(n_pairs) < 0.5
    write_bin(str(path), images, issame)
    return issame


def test_the_training_spec_finds_its_sets_and_logs_flat_metrics(tmp_path):
    """from_config: named sets looked for in bin_dir first, then the data directory, max_pairs keeps the first
    pairs; scalar_metrics: val/<set>_acc and val/mean_acc, the scoring functions' numbers."""
    import ml_collections  # noqa: PLC0415

    from adaface_jax.errors import ConfigError  # noqa: PLC0415
    from evaluation.evaluators import EVALUATORS  # noqa: PLC0415
    (tmp_path / "bins").mkdir()
    (tmp_path / "data").mkdir()
    lfw = _write_bin(tmp_path / "bins" / "lfw.bin", 30, seed=0)
    _write_bin(tmp_path / "data" / "lfw.bin", 10, seed=1)  # shadowed by bin_dir's
    agedb = _write_bin(tmp_path / "data" / "agedb_30.bin", 20, seed=2)
    _write_bin(tmp_path / "data" / "other.bin", 5, seed=3)  # not named: not read
    cls = EVALUATORS["verification"]
    spec = ml_collections.ConfigDict({"type": "verification", **cls.CONFIG_DEFAULTS})
    spec.sets, spec.bin_dir, spec.max_pairs = ("lfw", "agedb_30", "cfp_fp"), str(tmp_path / "bins"), 25
    evaluator = cls.from_config(spec, str(tmp_path / "data"))
    assert sorted(evaluator.sets) == ["agedb_30", "lfw"]  # cfp_fp.bin is missing: warned about, not fatal
    np.testing.assert_array_equal(evaluator.sets["lfw"][1], lfw[:25])
    np.testing.assert_array_equal(evaluator.sets["agedb_30"][1], agedb)
    assert evaluator.sets["lfw"][0].shape == (50, 112, 112, 3)

    rs = np.random.RandomState(4)
    table = _unit(rs.randn(256, 8)).astype(np.float32)  # features by the row number written into each image

    def embed_fn(images):
        return table[np.asarray(images)[:, 0, 0, 0]], np.ones((len(images), 1), np.float32)

    metrics = evaluator.scalar_metrics(evaluator.run(embed_fn))
    expected = {f"val/{name}_acc": float(np.mean(verification.evaluate(table[:2 * len(evaluator.sets[name][1])],
                                                                       evaluator.sets[name][1])[2]))
                for name in ("lfw", "agedb_30")}
    assert metrics == {**expected, "val/mean_acc": pytest.approx(np.mean(list(expected.values())))}
    assert "val/mean_acc" in cls.metric_names(spec)

    spec.sets, spec.bin_dir = ("cfp_fp",), ""
    with pytest.raises(ConfigError, match=r"^config.evals.hq: no cfp_fp.bin found in .*data; set "
                                          r"config.evals.hq.bin_dir, or every_epochs=0"):
        cls.from_config(spec, str(tmp_path / "data"), where="config.evals.hq")
