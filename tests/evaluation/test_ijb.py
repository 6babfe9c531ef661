"""IJB-B/C scoring (validation_mixed/validate_IJB_BC.py) against sklearn, brute force and loop implementations written from the spec."""

import cv2
import numpy as np
import pytest
import sklearn.metrics
from skimage.transform import SimilarityTransform

from adaface_jax.align import iter_warped_crops
from adaface_jax.errors import InputError
from evaluation import ijb
from tests.support.eval_fixtures import FEATS, LM, TID_MID, small_meta, write_meta

# ArcFace 96x112 template as float32, shifted by +8 in x in float32 (insightface_ijb_helper/dataloader.py `ImageAligner`)
TEMPLATE_112 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                         [33.5493, 92.3655], [62.7299, 92.2041]], np.float32)
TEMPLATE_112[:, 0] += np.float32(8.0)


# ---- independent references -------------------------------------------------------------------

def loop_templates(feats, templates, medias, divide=False):
    """eval_helper.py `image2template_feature` literally: per template (ascending), per media (ascending) mean, sum, normalise."""
    uniq = np.unique(templates)
    out = np.zeros((len(uniq), feats.shape[1]))
    for i, t in enumerate(uniq):
        rows = np.where(templates == t)[0]
        for m in np.unique(medias[rows]):
            out[i] += feats[rows[medias[rows] == m]].astype(np.float64).mean(0)
        n = np.linalg.norm(out[i])
        if n > 0 or divide:
            with np.errstate(invalid="ignore"):
                out[i] = out[i] / n
    return uniq, out


def loop_tar_at_far(fpr, tpr, x):
    """validate_IJB_BC.py 1:1 verification rule: reversed arrays, smallest index minimising |fpr - x|."""
    fr, tr = fpr[::-1], tpr[::-1]
    best_i, best_d = None, None
    for i in range(len(fr)):
        d = abs(fr[i] - x)
        if best_d is None or d < best_d:
            best_i, best_d = i, d
    return tr[best_i]


def test_template_pooling_hand_values():
    t = np.array([10, 10, 10, 20, 30, 30, 40, 50])
    m = np.array([1, 1, 2, 3, 5, 5, 6, 7])
    uniq, tf = ijb.image_to_template(FEATS, t, m)
    np.testing.assert_array_equal(uniq, [10, 20, 30, 40, 50])
    # template 10: mean([1,0],[3,0]) + [0,2] = [2, 2] -> [.707, .707]
    np.testing.assert_allclose(tf[0], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    np.testing.assert_allclose(tf[2], [0, 1], atol=1e-7)
    _, ref = loop_templates(FEATS, t, m)
    np.testing.assert_allclose(tf, ref, atol=1e-6)


def test_template_pooling_random_against_loop_and_zero_rows():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 30, 400)
    m = rng.integers(0, 7, 400) + 1000 * (t % 3)  # same media id in several templates
    f = rng.normal(size=(400, 5)).astype(np.float32)
    f[t == 3] = 0  # an all-zero template
    uniq, tf = ijb.image_to_template(f, t, m)
    ru, ref = loop_templates(f, t, m)
    np.testing.assert_array_equal(uniq, ru)
    np.testing.assert_allclose(tf, ref, atol=1e-5)
    assert np.all(tf[uniq == 3] == 0)
    _, tf_div = ijb.image_to_template(f, t, m, normalize="divide")
    assert np.isnan(tf_div[uniq == 3]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1).astype(np.float32)  # many equal scores
    fpr, tpr, thr = ijb.roc_curve(y, s)
    rf, rt, rth = sklearn.metrics.roc_curve(y, s)
    np.testing.assert_array_equal(fpr, rf)
    np.testing.assert_array_equal(tpr, rt)
    np.testing.assert_array_equal(thr[1:], rth[1:])
    for x in ijb.FAR_TARGETS + (0.3, 0.5):
        assert ijb.tar_at_far(fpr, tpr, [x])[x] == loop_tar_at_far(rf, rt, x)


def test_tar_at_far_tie_rules_by_hand():
    fpr = np.array([0.0, 0.2, 0.2, 0.6, 1.0])
    tpr = np.array([0.0, 0.3, 0.5, 0.9, 1.0])
    got = ijb.tar_at_far(fpr, tpr, [0.2, 0.4])
    assert got[0.2] == 0.5  # equal FPRs -> the largest TPR
    assert got[0.4] == 0.9  # equidistant 0.2 / 0.6 -> the larger FPR (first in reversed order)


def test_roc_hand_example_equal_scores():
    # scores: 0.9(+), 0.8(+), 0.8(-), 0.5(-), 0.5(-), 0.3(+); the 0.8 tie is one ROC point
    # (tps, fps) at run ends: (1,0) (2,1) (2,3) (3,3) -- no three collinear, nothing dropped
    y = np.array([1, 1, 0, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.8, 0.5, 0.5, 0.3])
    fpr, tpr, _ = ijb.roc_curve(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1])
    # collinear middle point dropped (drop_intermediate): +, (+,-), (-,+)
    fpr, tpr, _ = ijb.roc_curve([1, 1, 0, 0, 1], [0.9, 0.8, 0.8, 0.5, 0.5])
    np.testing.assert_allclose(fpr, [0, 0, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1])


def test_verification_end_to_end(tmp_path):
    meta = small_meta(tmp_path)
    res = ijb.verification_11(meta, FEATS)
    _, tf = loop_templates(FEATS, meta.templates, meta.medias)
    idx = {t: i for i, t in enumerate(np.unique(meta.templates))}
    scores = [tf[idx[a]] @ tf[idx[b]] for a, b in zip(meta.pair_t1, meta.pair_t2)]
    rf, rt, _ = sklearn.metrics.roc_curve(meta.pair_label, scores)
    for x in ijb.FAR_TARGETS:
        assert res["tar_at_far"][x] == pytest.approx(loop_tar_at_far(rf, rt, x))
    assert res["num_pairs"] == 6 and res["num_genuine"] == 3


def brute_rank(scores_row, mate_cols):
    order = np.argsort(-scores_row, kind="stable")
    return min(int(np.where(order == c)[0][0]) for c in mate_cols)


def test_identification_end_to_end(tmp_path):
    meta = small_meta(tmp_path)
    res = ijb.identification_1n(meta, FEATS)
    uniq, tf = loop_templates(FEATS, meta.templates, meta.medias, divide=True)
    idx = {t: i for i, t in enumerate(uniq)}
    g = np.stack([tf[idx[10]], tf[idx[30]], tf[idx[40]]])
    g_subj = [100, 300, 400]
    ranks = []
    for pt, ps in ((20, 100), (50, 400)):
        ranks.append(brute_rank(g @ tf[idx[pt]], [g_subj.index(ps)]))
    ranks = np.array(ranks)
    for k in (1, 5, 10):
        assert res["rank"][k] == pytest.approx(np.mean(ranks < k))
    assert res["num_gallery"] == 3 and res["num_probes"] == 2


def test_identification_random_against_bruteforce():
    from evaluation import ranking
    rng = np.random.default_rng(5)
    s = np.round(rng.normal(size=(40, 12)), 1)  # ties
    mates = rng.integers(0, 12, 40)
    is_mate = np.zeros_like(s, bool)
    is_mate[np.arange(40), mates] = True
    is_mate[::7, 3] = True  # some probes with two mates (TinyFace allows that)
    r = ranking.best_mate_rank(s, is_mate, "stable")
    for i in range(40):
        assert r[i] == brute_rank(s[i], np.flatnonzero(is_mate[i]))
    r2 = ranking.best_mate_rank(s, is_mate, "reversed")
    for i in range(40):
        order = np.argsort(s[i], kind="stable")[::-1]
        assert r2[i] == min(int(np.where(order == c)[0][0]) for c in np.flatnonzero(is_mate[i]))


def test_reference_pooled_tpir_bruteforce():
    rng = np.random.default_rng(7)
    p = rng.normal(size=(30, 4)); p /= np.linalg.norm(p, axis=1, keepdims=True)
    g = rng.normal(size=(9, 4)); g /= np.linalg.norm(g, axis=1, keepdims=True)
    mate = rng.integers(0, 9, 30)
    got = ijb._reference_pooled_tpir(p, g, mate, (0.01, 0.1), chunk=7)
    s = p @ g.T
    mask = np.zeros_like(s, bool); mask[np.arange(30), mate] = True
    neg = np.sort(s[~mask])[::-1]
    for far in (0.01, 0.1):
        k = int(np.ceil(30 * far))
        assert got[far] == pytest.approx(np.mean(s[mask] > neg[k - 1]))


def test_standard_per_gallery_tpir(tmp_path):
    # G1 holds subjects 100/300, G2 holds 400: probe 20 (subj 100) is non-mated in G2 and vice versa
    meta = small_meta(tmp_path)
    res = ijb.identification_1n(meta, FEATS)
    uniq, tf = loop_templates(FEATS, meta.templates, meta.medias, divide=True)
    idx = {t: i for i, t in enumerate(uniq)}
    g1 = np.stack([tf[idx[10]], tf[idx[30]]])
    p20, p50 = tf[idx[20]], tf[idx[50]]
    # G1: mated = probe 20 (mate col 0); non-mated = probe 50
    thr = np.max(g1 @ p50)
    s = g1 @ p20
    expect = float(s[0] > s[1] and s[0] > thr)
    assert res["standard_tpir_at_fpir"]["G1"][0.01] == expect


# ---- malformed inputs -----------------------------------------------------------------------------

def test_missing_columns_names_file_and_line(tmp_path):
    bad = [f"{n.split()[0]} {LM}" for n in TID_MID]
    bad[3] = "d.jpg 1 2 3"
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score.txt:4: expected 12"):
        small_meta(tmp_path, lm_lines=bad)


def test_mismatched_line_counts(tmp_path):
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid.txt: 7 lines but .*has 8"):
        small_meta(tmp_path, tid_mid=TID_MID[:-1])


def test_unknown_template_in_pairs(tmp_path):
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label.txt:2: unknown template id 99"):
        small_meta(tmp_path, pairs=["10 20 1", "10 99 0"])


def test_unknown_template_reference_row0_option(tmp_path):
    # the reference's dense id->row array maps unknown ids to row 0 (template 10 here)
    with pytest.raises(ValueError, match="unknown template id 99"):
        small_meta(tmp_path, pairs=["10 20 1", "20 99 0", "30 40 0"])
    meta = ijb.load_meta(str(tmp_path), "IJBC", unknown="row0")
    uniq, tf = ijb.image_to_template(FEATS, meta.templates, meta.medias)
    s = ijb.pair_scores(uniq, tf, meta.pair_t1, meta.pair_t2, unknown="row0")
    assert s[1] == pytest.approx(tf[1] @ tf[0])


def test_bad_pair_line(tmp_path):
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label.txt:2: expected 3 fields"):
        small_meta(tmp_path, pairs=["10 20 1", "10 30"])


def test_unknown_template_in_gallery_csv(tmp_path):
    meta = small_meta(tmp_path, g2=["40,400,g.jpg", "77,700,x.jpg"])
    with pytest.raises(ValueError, match=r"ijbc_1N_gallery_G2.csv:3: unknown template id 77"):
        ijb.identification_1n(meta, FEATS)


def test_probe_with_two_mates(tmp_path):
    meta = small_meta(tmp_path, g2=["40,400,g.jpg", "50,100,h.jpg"], probe=["20,100,d.jpg"])
    with pytest.raises(ValueError, match=r"ijbc_1N_probe_mixed.csv:2: probe template 20 .* 2 mates"):
        ijb.identification_1n(meta, FEATS)


def test_probe_without_mate(tmp_path):
    meta = small_meta(tmp_path, probe=["20,100,d.jpg", "50,999,h.jpg"])
    with pytest.raises(ValueError, match=r"ijbc_1N_probe_mixed.csv:3: .* 0 mates"):
        ijb.identification_1n(meta, FEATS)


def test_empty_gallery(tmp_path):
    meta = small_meta(tmp_path, g1=[], g2=[])
    (tmp_path / "IJBC" / "meta" / "ijbc_1N_gallery_G1.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
    (tmp_path / "IJBC" / "meta" / "ijbc_1N_gallery_G2.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
    with pytest.raises(ValueError, match=r"ijbc_1N_gallery_G1.csv: no data lines"):
        ijb.identification_1n(meta, FEATS)


def test_csv_inconsistent_field_count(tmp_path):
    meta = small_meta(tmp_path, g1=["10,100,a.jpg", "30,300"])
    with pytest.raises(ValueError, match=r"ijbc_1N_gallery_G1.csv:3: 2 fields"):
        ijb.identification_1n(meta, FEATS)


def test_wrong_feature_count(tmp_path):
    meta = small_meta(tmp_path)
    with pytest.raises(ValueError, match="7 image features"):
        ijb.verification_11(meta, FEATS[:7])


# ---- alignment of loose crops (insightface_ijb_helper/dataloader.py `ImageAligner`) ----------------------------------------------------------

def test_loose_crop_alignment_matches_skimage_cv2(tmp_path):
    rng = np.random.default_rng(0)
    crop_dir = tmp_path / "IJBC" / "loose_crop"
    crop_dir.mkdir(parents=True)
    imgs = []
    for n in TID_MID:
        img = rng.integers(0, 256, (150, 130, 3), dtype=np.uint8)
        cv2.imwrite(str(crop_dir / n.split()[0]), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
        imgs.append(cv2.imread(str(crop_dir / n.split()[0])))
    meta = small_meta(tmp_path)
    got = list(iter_warped_crops(ijb.crop_paths(meta), meta.landmarks, "umeyama"))
    lm = meta.landmarks[0]
    # The reference IJB loader's template: float32 4-decimal points, +8 in float32 (insightface_ijb_helper/dataloader.py `ImageAligner`).
    tform = SimilarityTransform.from_estimate(lm.astype(np.float64), TEMPLATE_112.astype(np.float64))
    ref = cv2.warpAffine(imgs[0], tform.params[0:2, :], (112, 112), borderValue=0.0)
    assert len(got) == 8 and got[0].shape == (112, 112, 3)
    np.testing.assert_array_equal(got[0], ref)


def test_missing_loose_crop(tmp_path):
    meta = small_meta(tmp_path)
    with pytest.raises(InputError, match="a.jpg"):
        next(iter_warped_crops(ijb.crop_paths(meta), meta.landmarks))


def test_pair_scores_blocked_against_direct():
    rng = np.random.default_rng(11)
    tf = rng.normal(size=(23, 6)).astype(np.float32)
    uniq = np.arange(100, 123)
    t1 = rng.integers(100, 123, 300)
    t2 = rng.integers(100, 123, 300)
    got = ijb.pair_scores(uniq, tf, t1, t2, chunk=4)
    ref = np.array([tf[a - 100].astype(np.float64) @ tf[b - 100] for a, b in zip(t1, t2)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pairs.txt:3: unknown template id 5 in column t2"):
        ijb.pair_scores(uniq, tf, np.array([100, 101, 102]), np.array([101, 102, 5]), path="pairs.txt")


def test_standard_tpir_random_against_loop():
    from evaluation import ranking
    rng = np.random.default_rng(12)
    g = rng.normal(size=(10, 4)); g /= np.linalg.norm(g, axis=1, keepdims=True)
    g_subj = np.arange(10)
    p_subj = rng.integers(0, 20, 200)  # subjects >= 10 are non-mated
    p = g[np.minimum(p_subj, 9)] + 0.9 * rng.normal(size=(200, 4))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    mated = p_subj < 10
    _, ms, mnm = ranking.mate_ranks_chunked(p[mated], g, lambda idx: p_subj[mated][idx, None] == g_subj[None], chunk=17)
    _, _, nm = ranking.mate_ranks_chunked(p[~mated], g, lambda idx: np.zeros((idx.size, 10), bool), chunk=17)
    got = ranking.standard_tpir_fpir(ms, mnm, nm, (0.01, 0.1, 0.3))
    s = p @ g.T
    nm_max = sorted((s[i].max() for i in range(200) if not mated[i]), reverse=True)
    for fpir in (0.01, 0.1, 0.3):
        thr = nm_max[max(int(len(nm_max) * fpir) - 1, 0)]
        hits = []
        for i in np.flatnonzero(mated):
            pos = s[i, p_subj[i]]
            neg = np.delete(s[i], p_subj[i])
            hits.append(pos > neg.max() and pos > thr)
        assert got[fpir] == pytest.approx(np.mean(hits))


# exact ties: the original's scoring, bit for bit


def _original_pair_scores(t_feats, r1, r2):
    """The original's 1:1 scoring (validate_IJB_BC.py 1:1 verification): np.sum(feat1 * feat2, -1) in batches of 100000 pairs."""
    out = np.zeros(r1.size, np.float32)
    for s in range(0, r1.size, 100000):
        out[s:s + 100000] = np.sum(t_feats[r1[s:s + 100000]] * t_feats[r2[s:s + 100000]], -1)
    return out


def _original_tar(labels, scores):
    fpr, tpr, _ = sklearn.metrics.roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return {x: float(tpr[np.argmin(np.abs(fpr - x))]) for x in ijb.FAR_TARGETS}


def test_identical_templates_score_bit_identically_and_match_the_original(tmp_path):
    rng = np.random.default_rng(7)
    n_t, dim = 300, 64
    base = rng.normal(size=(n_t, dim)).astype(np.float32)
    picked = rng.choice(n_t, 120, replace=False)
    copies = {int(d): int(s) for d, s in zip(picked[:60], picked[60:])}  # sources are never overwritten
    for dst, src in copies.items():
        base[dst] = base[src]
    # one image per template; template ids 1000 + row; images in a shuffled order
    order = rng.permutation(n_t)
    tids = 1000 + order
    feats = base[order]
    lines = [f"i{k}.jpg {LM}" for k in range(n_t)]
    tid_mid = [f"i{k}.jpg {t} {t}" for k, t in enumerate(tids)]
    n_pairs = 6000
    t1 = rng.integers(0, n_t, n_pairs)
    t2 = rng.integers(0, n_t, n_pairs)
    dup_pairs = np.array(list(copies.items()))
    t1[:len(dup_pairs)], t2[:len(dup_pairs)] = dup_pairs[:, 0], dup_pairs[:, 1]  # copies of each other
    labels = (rng.random(n_pairs) < 0.3).astype(int)
    labels[:len(dup_pairs)] = 1
    write_meta(tmp_path, lm_lines=lines, tid_mid=tid_mid,
               pairs=[f"{1000 + a} {1000 + b} {y}" for a, b, y in zip(t1, t2, labels)])
    meta = ijb.load_meta(str(tmp_path), "IJBC")
    uniq, t_feats = ijb.image_to_template(feats, meta.templates, meta.medias)
    r1, r2 = np.searchsorted(uniq, meta.pair_t1), np.searchsorted(uniq, meta.pair_t2)
    got = ijb.pair_scores(uniq, t_feats, meta.pair_t1, meta.pair_t2, chunk=257)
    np.testing.assert_array_equal(got, _original_pair_scores(t_feats, r1, r2))
    # identical templates at different rows: bit-identical scores against every other template
    for dst, src in list(copies.items())[:20]:
        others = np.arange(n_t)
        a = ijb.pair_scores(uniq, t_feats, np.full(n_t, 1000 + dst), 1000 + others)
        b = ijb.pair_scores(uniq, t_feats, 1000 + others, np.full(n_t, 1000 + src))
        np.testing.assert_array_equal(a, b)
    ver = ijb.verification_11(meta, feats)
    assert ver["tar_at_far"] == _original_tar(meta.pair_label, _original_pair_scores(t_feats, r1, r2))
