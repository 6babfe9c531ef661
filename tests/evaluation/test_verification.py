"""evaluation.verification against a straightforward loop implementation of the reference (evaluate_utils.py `calculate_roc`, `calculate_accuracy`, `calculate_val`)."""
import cv2
import numpy as np
import pytest
from sklearn.model_selection import KFold

from evaluation import ProtocolError, verification
from tests.support.verification_pairs import verification_pairs as _hq


def loop_reference_roc(thresholds, emb1, emb2, issame, nrof_folds=10):
    """Loop-per-(fold, threshold) reference of calculate_roc, written from the spec."""
    nrof_pairs = min(len(issame), emb1.shape[0])
    diff = np.subtract(emb1, emb2)
    dist = np.sum(np.square(diff), 1)
    k_fold = KFold(n_splits=nrof_folds, shuffle=False)
    tprs = np.zeros((nrof_folds, len(thresholds)))
    fprs = np.zeros((nrof_folds, len(thresholds)))
    accuracy = np.zeros(nrof_folds)
    best = np.zeros(nrof_folds)

    def acc_at(thr, d, same):
        pred = np.less(d, thr)
        tp = np.sum(np.logical_and(pred, same))
        fp = np.sum(np.logical_and(pred, np.logical_not(same)))
        tn = np.sum(np.logical_and(np.logical_not(pred), np.logical_not(same)))
        fn = np.sum(np.logical_and(np.logical_not(pred), same))
        tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
        fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
        return tpr, fpr, float(tp + tn) / d.size

    for f, (train, test) in enumerate(k_fold.split(np.arange(nrof_pairs))):
        acc_train = np.zeros(len(thresholds))
        for t, thr in enumerate(thresholds):
            _, _, acc_train[t] = acc_at(thr, dist[train], issame[train])
        bi = np.argmax(acc_train)
        best[f] = thresholds[bi]
        for t, thr in enumerate(thresholds):
            tprs[f, t], fprs[f, t], _ = acc_at(thr, dist[test], issame[test])
        _, _, accuracy[f] = acc_at(thresholds[bi], dist[test], issame[test])
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy, best


def assert_same_roc(ours, ref):
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


def test_fold_slices_match_kfold():
    for n in (10, 13, 6003, 7000):
        got = [(s.start, s.stop) for s in verification.fold_slices(n, 10)]
        ref = [(t[0], t[-1] + 1) for _, t in KFold(10).split(np.arange(n))]
        assert got == ref
    assert [s.stop - s.start for s in verification.fold_slices(6003, 10)][:4] == [601, 601, 601, 600]


def test_hand_checkable_two_folds():
    # 4 pairs, 2 folds; distances exactly on the 0.01 grid stress the strict '<'.
    e = np.zeros((8, 2), np.float32)
    # pair distances: squared L2 of (a, 0) vs (0, 0) = a^2
    for i, d in enumerate([0.25, 1.0, 0.25, 2.25]):
        e[2 * i, 0] = np.sqrt(d)
    issame = np.array([True, False, True, False])
    tpr, fpr, acc, best = verification.evaluate(e, issame, nrof_folds=2)
    # train on fold 2 (d=.25 same, 2.25 diff): accuracy 1 for thresholds in (0.25, 2.25];
    # the first maximum is 0.26 (0.25 is excluded by the strict '<').
    assert best[0] == pytest.approx(0.26)
    # fold 2 trains on (0.25 same, 1.0 diff): first max at 0.26
    assert best[1] == pytest.approx(0.26)
    np.testing.assert_array_equal(acc, [1.0, 1.0])
    assert_same_roc((tpr, fpr, acc, best),
                    loop_reference_roc(verification.THRESHOLDS, e[0::2], e[1::2], issame, 2))


@pytest.mark.parametrize("n_pairs", [60, 63, 107])
def test_matches_loop_reference_random(n_pairs):
    rng = np.random.default_rng(n_pairs)
    emb = rng.normal(size=(2 * n_pairs, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    issame = rng.random(n_pairs) < 0.5
    # make the same pairs closer and create exact ties on the grid
    emb[1::2][issame] = emb[0::2][issame] + 0.3 * emb[1::2][issame]
    emb[2:6] = emb[6:10]
    emb = emb.astype(np.float32)
    ours = verification.evaluate(emb, issame)
    ref = loop_reference_roc(verification.THRESHOLDS, emb[0::2], emb[1::2], issame)
    assert_same_roc(ours, ref)


def test_empty_class_in_fold_gives_zero_rates():
    # all pairs positive -> FPR denominators are 0 everywhere
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 4)).astype(np.float32)
    issame = np.ones(20, bool)
    assert_same_roc(verification.evaluate(emb, issame),
                    loop_reference_roc(verification.THRESHOLDS, emb[0::2], emb[1::2], issame))


def test_float32_distance_compared_exactly():
    # A float32 distance just above a float64 threshold must not be accepted there.
    thr = verification.THRESHOLDS[7]  # 0.07000000000000001
    d32 = np.float32(thr)
    e = np.zeros((20, 1), np.float32)
    e[0::2, 0] = np.sqrt(np.float32(d32))
    issame = np.array([True] * 5 + [False] * 5)
    ours = verification.evaluate(e, issame, nrof_folds=2)
    ref = loop_reference_roc(verification.THRESHOLDS, e[0::2], e[1::2], issame, 2)
    assert_same_roc(ours, ref)


def test_bad_shapes():
    with pytest.raises(ValueError, match="interleaved"):
        verification.evaluate(np.zeros((5, 3), np.float32), np.ones(2, bool))
    with pytest.raises(ValueError, match="folds"):
        verification.evaluate(np.zeros((10, 3), np.float32), np.ones(5, bool))


# ---- TAR@FAR (evaluate_utils.py `calculate_val_far`): old-SciPy slinear emulation ------------------------------------------

def test_slinear_hand_cases():
    thr = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    far = np.array([0.0, 0.0, 0.25, 0.25, 0.5, 1.0])
    # between last 0.0 (thr 0.1) and first 0.25 (thr 0.2): 0.1 + 0.5*0.1
    assert verification.slinear_threshold(far, thr, 0.125) == pytest.approx(0.15)
    # exact tie -> the largest threshold of the tie group
    assert verification.slinear_threshold(far, thr, 0.25) == pytest.approx(0.3)
    # between last 0.25 (0.3) and 0.5 (0.4)
    assert verification.slinear_threshold(far, thr, 0.375) == pytest.approx(0.35)


def loop_reference_val(thresholds, emb1, emb2, issame, far_target, nrof_folds=10):
    dist = np.sum(np.square(np.subtract(emb1, emb2)), 1)
    val, far = np.zeros(nrof_folds), np.zeros(nrof_folds)
    for f, (train, test) in enumerate(KFold(nrof_folds).split(np.arange(len(issame)))):
        far_train = np.zeros(len(thresholds))
        for t, th in enumerate(thresholds):
            pred = dist[train] < th
            far_train[t] = np.sum(pred & ~issame[train]) / np.sum(~issame[train])
        if np.max(far_train) >= far_target:
            # brute force of the spec rule
            exact = [i for i in range(len(far_train)) if far_train[i] == far_target]
            if exact:
                th = thresholds[exact[-1]]
            else:
                lo = max(v for v in far_train if v < far_target)
                hi = min(v for v in far_train if v > far_target)
                i_lo = max(i for i in range(len(far_train)) if far_train[i] == lo)
                i_hi = min(i for i in range(len(far_train)) if far_train[i] == hi)
                th = thresholds[i_lo] + (far_target - lo) * (thresholds[i_hi] - thresholds[i_lo]) / (hi - lo)
        else:
            th = 0.0
        pred = dist[test] < th
        val[f] = np.sum(pred & issame[test]) / np.sum(issame[test])
        far[f] = np.sum(pred & ~issame[test]) / np.sum(~issame[test])
    return np.mean(val), np.std(val), np.mean(far)


def test_tar_far_matches_loop_reference():
    rng = np.random.default_rng(3)
    n = 200
    emb = rng.normal(size=(2 * n, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    issame = np.tile([True, False], n // 2)
    emb[1::2][issame] = (emb[0::2][issame] + 0.5 * emb[1::2][issame]).astype(np.float32)
    thresholds = np.arange(0, 4, 0.01)
    ours = verification.evaluate_tar_far(emb, issame, far_target=0.05, thresholds=thresholds)
    ref = loop_reference_val(thresholds, emb[0::2], emb[1::2], issame, 0.05)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


# ---- real .bin data --------------------------------------------------------------------------

def _decode_bin(path):
    from data_pipeline.bin_reader import load_bin  # safe unpickler + cv2 decode (BGR)
    imgs, issame = load_bin(str(path))
    return np.asarray(imgs), np.asarray(issame, bool)


def _projection_features(imgs):
    """Cheap deterministic features: a fixed random projection of 16x16 grey thumbnails."""
    small = np.stack([cv2.resize(cv2.cvtColor(i, cv2.COLOR_BGR2GRAY), (16, 16), interpolation=cv2.INTER_AREA)
                      for i in imgs]).reshape(len(imgs), -1).astype(np.float32)
    small -= small.mean(axis=1, keepdims=True)
    proj = np.random.default_rng(1234).normal(size=(small.shape[1], 64)).astype(np.float32)
    f = small @ proj
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def test_real_lfw_6000_pairs_matches_loop(shared_data):
    path = shared_data / "lfw_gray112.bin"
    if not path.exists():
        pytest.skip(f"{path} not present")
    imgs, issame = _decode_bin(path)
    assert imgs.shape == (12000, 112, 112, 3) and issame.shape == (6000,)
    feats = _projection_features(imgs)
    ours = verification.evaluate(feats, issame)
    ref = loop_reference_roc(verification.THRESHOLDS, feats[0::2], feats[1::2], issame)
    assert_same_roc(ours, ref)
    assert 0.55 < ours[2].mean() < 1.0  # better than chance on real faces


def test_real_small_lfw(shared_data):
    path = shared_data / "small_lfw.bin"
    if not path.exists():
        pytest.skip(f"{path} not present")
    imgs, issame = _decode_bin(path)
    assert imgs.shape == (20, 112, 112, 3) and issame.all()
    feats = _projection_features(imgs)
    ours = verification.evaluate(feats, issame)
    assert_same_roc(ours, loop_reference_roc(verification.THRESHOLDS, feats[0::2], feats[1::2], issame))


def test_pair_and_label_counts_must_match():
    f, i = _hq()
    with pytest.raises(ProtocolError, match="20 pairs of embeddings but 19 issame labels"):
        verification.calculate_roc(verification.THRESHOLDS, f[0::2], f[1::2], i[:19])
    with pytest.raises(ProtocolError, match="20 pairs of embeddings but 21 issame labels"):
        verification.calculate_val(verification.VAL_THRESHOLDS, f[0::2], f[1::2], np.r_[i, True], 1e-3)
