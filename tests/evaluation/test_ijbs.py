"""IJB-S (validation_lq/validate_IJB_S.py) rebuilt from CS6 CSV fixtures, scored against loop implementations of the spec."""
import numpy as np
import pytest

from evaluation import ijbs
from tests.support.eval_fixtures import IMAGES, write_protocol

def test_protocol_sets(tmp_path):
    p = write_protocol(tmp_path)
    T = ijbs.Template
    assert p["video2image_probe"] == [T("1", ("videos/100.mp4",)), T("2", ("videos/100.mp4",)),
                                      T("3", ("videos/102.mp4",))]
    assert p["video2video_probe"] == [T("1", ("videos/100.mp4",)), T("2", ("videos/100.mp4",))]
    assert p["multiview_video_probe"] == [T("1", ("videos/100.mp4", "videos/101.mp4")),
                                          T("2", ("videos/100.mp4", "videos/103.mp4"))]
    assert p["uav_probe"] == [T("3", ("videos/102.mp4",)), T("2", ("img/12.jpg",)), T("1", ("img/15.jpg",))]
    assert p["booking_image_gallery1"] == [T("1", ("img/11.jpg", "img/15.jpg"))]
    assert [t.subject for t in p["booking_image_gallery2"]] == ["2", "3", "4"]
    assert p["video_gallery2"] == [T("2", ("videos/103.mp4",))]
    assert T("1", ("videos/100.mp4", "img/11.jpg")).keys() == ["1_videos_100", "1_img_11"]
    assert [ijbs.image_key(x) for x in IMAGES[:2] + IMAGES[6:7]] == ["1_videos_100", "1_videos_100", "1_img_11"]


def loop_template(t, paths, raw):
    keys = t.keys()
    idx = [i for i, p in enumerate(paths) if ijbs.image_key(p) in keys]
    if not idx:
        return np.zeros(raw.shape[1])
    m = raw[idx].astype(np.float64).mean(0)
    return m / (np.linalg.norm(m) + 1e-8)


def loop_dir_far(probe_f, probe_s, gal_f, gal_s, ranks, fars):
    """validation_lq/validate_IJB_S.py metrics with explicit loops and stable descending sorts."""
    S = np.hstack([probe_f @ g.T for g in gal_f])
    labels = np.concatenate(gal_s)
    closed = {r: [] for r in ranks}
    for i in range(len(probe_s)):
        m = labels == probe_s[i]
        assert m.sum() <= 1
        if not m.any():
            continue
        order = np.argsort(-S[i], kind="stable")
        pos = int(np.flatnonzero(m[order])[0])
        for r in ranks:
            closed[r].append(pos < r)
    opens = []
    for g, gs in zip(gal_f, gal_s):
        s = probe_f @ g.T
        nm_max, mated = [], []
        for i in range(len(probe_s)):
            m = gs == probe_s[i]
            if m.any():
                order = np.argsort(-s[i], kind="stable")
                mated.append((m[order][0], s[i][m][0]))
            else:
                nm_max.append(s[i].max())
        nm_sorted = sorted(nm_max, reverse=True)
        res = {}
        for far in fars:
            k = int(len(nm_max) * far)
            thr = nm_sorted[0] + 1e-8 if k == 0 else nm_sorted[k - 1]
            res[far] = np.mean([top and sc >= thr for top, sc in mated]) if mated else np.nan
        opens.append(res)
    return ({r: np.mean(v) for r, v in closed.items()},
            {f: np.mean([o[f] for o in opens]) for f in fars})


def test_evaluate_against_loops(tmp_path):
    p = write_protocol(tmp_path)
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(len(IMAGES), 6)).astype(np.float32) * 3
    raw[7] = raw[6]  # equal scores between galleries' templates
    res = ijbs.evaluate(p, IMAGES, raw)
    assert list(res) == [n for n, _, _ in ijbs.PROTOCOLS]
    for name, probe_set, gal_sets in ijbs.PROTOCOLS:
        pf = np.stack([loop_template(t, IMAGES, raw) for t in p[probe_set]])
        ps = np.array([t.subject for t in p[probe_set]])
        gf = [np.stack([loop_template(t, IMAGES, raw) for t in p[g]]) for g in gal_sets]
        gs = [np.array([t.subject for t in p[g]]) for g in gal_sets]
        closed, opened = loop_dir_far(pf, ps, gf, gs, (1, 5, 10), (0.01, 0.1))
        assert res[name]["rank"] == pytest.approx(closed), name
        for f in (0.01, 0.1):
            assert res[name]["tpir_at_fpir"][f] == pytest.approx(opened[f], nan_ok=True), name


def test_missing_template_images_give_zero_feature():
    t = [ijbs.Template("9", ("videos/999.mp4",))]
    f = ijbs.template_features(t, ["1_videos_100"], np.ones((1, 3), np.float32))
    np.testing.assert_array_equal(f, 0)


def test_gallery_pair_not_in_metadata(tmp_path):
    with pytest.raises(ValueError, match=r"cs6_surveillance_to_surveillance_g1.csv:2: .*'videos/555.mp4'"):
        write_protocol(tmp_path, **{"galleries/cs6_surveillance_to_surveillance_g1.csv": ["0,1,videos/555.mp4,x"]})


def test_video_gallery_too_few_columns(tmp_path):
    with pytest.raises(ValueError, match=r"cs6_surveillance_to_surveillance_g2.csv:3: expected >= 3"):
        write_protocol(tmp_path, **{"galleries/cs6_surveillance_to_surveillance_g2.csv":
                                    ["0,2,videos/103.mp4,x", "0,2"]})


def test_uav_unknown_image(tmp_path):
    with pytest.raises(ValueError, match=r"cs6_uav_to_single-booking_probe.csv:3: image 'img/77.jpg'"):
        write_protocol(tmp_path, **{"cs6_uav_to_single-booking_probe.csv": ["videos/102.mp4", "img/77.jpg"]})


def test_probe_with_two_mates_across_galleries():
    pf = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match="2 mates"):
        ijbs.identification(pf, np.array(["1", "2"]), [pf[:1], pf[:1]], [np.array(["1"]), np.array(["1"])])


def test_image_list_csv(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text(",path\n0,1/img_11.jpg\n1,2/videos_100_0.jpg\n")
    assert ijbs.read_image_list(str(path)) == ["1/img_11.jpg", "2/videos_100_0.jpg"]
    path.write_text(",file\n0,1/img_11.jpg\n")
    with pytest.raises(ValueError, match="list.csv:1: expected a header with a 'path' column"):
        ijbs.read_image_list(str(path))


def test_gallery_without_nonmated_probe_is_error():
    pf = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match="gallery 1 .*no non-mated probe"):
        ijbs.identification(pf, np.array(["1", "2"]), [pf, pf[:0]], [np.array(["1", "2"]), np.array([], str)])
