"""TinyFace (validation_lq/validate_tinyface.py): deterministic protocol building and rank-k against a brute-force loop."""
import os
import shutil

import numpy as np
import pytest
import scipy.io

from evaluation import tinyface
from tests.support.eval_fixtures import make_tree, touch


PROBES = ["1_p1.jpg", "2_p1.png", "3_p1.jpg", "9_p1.jpg"]
MATCHES = ["1_g1.jpg", "1_g2.jpg", "2_g1.jpg", "3_g1.jpeg"]
DISTRACTORS = ["d_001.jpg", "d_002.jpg", "d_003.jpg"]


def brute_cmc(feats, proto, ranks):
    s = feats[proto.probe_rows] @ feats[proto.gallery_rows].T
    hits = {r: [] for r in ranks}
    for i in range(s.shape[0]):
        mates = proto.gallery_labels == proto.probe_labels[i]
        if not mates.any():
            continue
        order = np.argsort(-s[i], kind="stable")
        first = np.flatnonzero(mates[order])[0]
        for r in ranks:
            hits[r].append(first < r)
    return {r: float(np.mean(v)) for r, v in hits.items()}


def test_protocol_order_and_labels(tmp_path):
    make_tree(tmp_path, PROBES, MATCHES, DISTRACTORS)
    p = tinyface.build_protocol(str(tmp_path))
    names = [x.split("aligned_pad_0.1_pad_high/")[1] for x in p.image_paths]
    assert names[:4] == ["Probe/1_p1.jpg", "Probe/2_p1.png", "Probe/3_p1.jpg", "Probe/9_p1.jpg"]
    assert len(names) == 11
    np.testing.assert_array_equal(p.probe_labels, [1, 2, 3, 9])
    np.testing.assert_array_equal(p.gallery_labels, [1, 1, 2, 3, -100, -100, -100])


def test_rank_k_hand_and_bruteforce(tmp_path):
    make_tree(tmp_path, PROBES, MATCHES, DISTRACTORS)
    p = tinyface.build_protocol(str(tmp_path))
    rng = np.random.default_rng(0)
    f = rng.normal(size=(11, 3)).astype(np.float32)
    f[p.gallery_rows[4]] = f[p.probe_rows[0]]  # a distractor tied with... the probe itself
    f[p.gallery_rows[1]] = f[p.probe_rows[0]]  # ...and a mate: equal scores
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    res = tinyface.evaluate(f, p, ranks=(1, 2, 5, 20))
    assert res == pytest.approx(brute_cmc(f, p, (1, 2, 5, 20)))
    # probe 0: mate (gallery 1) and distractor (gallery 4) tie at the top: stable puts the mate
    # first, the reversed order (argsort(s)[::-1]) the distractor
    from evaluation import ranking
    s0 = f[p.gallery_rows] @ f[p.probe_rows[0]]
    mate0 = (p.gallery_labels == 1)[None]
    assert ranking.best_mate_rank(s0[None], mate0, "stable")[0] == 0
    assert ranking.best_mate_rank(s0[None], mate0, "reversed")[0] == 1


def test_hand_values(tmp_path):
    make_tree(tmp_path, ["1_p.jpg", "2_p.jpg"], ["1_g.jpg", "2_g.jpg"], ["x.jpg"])
    p = tinyface.build_protocol(str(tmp_path))
    f = np.zeros((5, 2), np.float32)
    # rows: Probe 1_p, 2_p; Match 1_g, 2_g; Distractor x
    f[0] = [1, 0]; f[1] = [0, 1]; f[2] = [0.6, 0.8]; f[3] = [0.8, 0.6]; f[4] = [1, 0]
    res = tinyface.evaluate(f, p, ranks=(1, 2, 3))
    # probe 1: scores g1 .6, g2 .8, x 1.0 -> mate rank 3; probe 2: .8, .6, 0 -> mate 2_g at rank 2
    assert res == {1: 0.0, 2: 0.5, 3: 1.0}


def test_stem_collision_is_error(tmp_path):
    make_tree(tmp_path, ["1_a.jpg"], ["1_a.png"], [])
    with pytest.raises(ValueError, match="collision.*'1_a'"):
        tinyface.build_protocol(str(tmp_path))
    p = tinyface.build_protocol(str(tmp_path), on_collision="last")
    assert p.probe_rows[0] == p.gallery_rows[0]


def test_missing_aligned_and_empty(tmp_path):
    make_tree(tmp_path, PROBES, MATCHES, DISTRACTORS)
    touch(tmp_path / "tinyface/Testing_Set/Probe/5_new.jpg")
    with pytest.raises(ValueError, match="5_new.jpg: no aligned image"):
        tinyface.build_protocol(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        tinyface.build_protocol(str(tmp_path / "nope"))


def test_bad_label_and_count(tmp_path):
    make_tree(tmp_path, ["abc_p.jpg"], ["1_g.jpg"], [], raw=False)
    with pytest.raises(ValueError, match="abc_p.jpg.*integer"):
        tinyface.build_protocol(str(tmp_path))
    make_tree(tmp_path / "b", ["1_p.jpg"], ["1_g.jpg"], [], raw=False)
    p = tinyface.build_protocol(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="3 features but 2"):
        tinyface.evaluate(np.zeros((3, 2), np.float32), p)


def test_tinyface_reads_the_real_protocol_mat_files(tmp_path, shared_data):
    src = shared_data / "tinyface_protocol"
    probe = scipy.io.loadmat(src / "probe_img_ID_pairs.mat")
    gallery = scipy.io.loadmat(src / "gallery_match_img_ID_pairs.mat")
    p_names = [str(c[0][0]) for c in probe["probe_set"]]
    g_names = [str(c[0][0]) for c in gallery["gallery_set"]]
    root = tmp_path / "tf"
    for set_name, names in (("Probe", p_names), ("Gallery_Match", g_names), ("Gallery_Distractor", ["d1.jpg"])):
        folder = root / "aligned_pad_0.1_pad_high" / set_name
        folder.mkdir(parents=True)
        for n in names:
            (folder / n).touch()
    mat_dir = root / "tinyface" / "Testing_Set"
    mat_dir.mkdir(parents=True)
    for f in ("probe_img_ID_pairs.mat", "gallery_match_img_ID_pairs.mat"):
        shutil.copy(src / f, mat_dir / f)
    proto = tinyface.build_protocol(str(root))
    assert proto.probe_rows.size == len(p_names) == 3728
    assert proto.gallery_rows.size == len(g_names) + 1 == 4444
    np.testing.assert_array_equal(proto.probe_labels, probe["probe_ids"].ravel())
    np.testing.assert_array_equal(proto.gallery_labels[:-1], gallery["gallery_ids"].ravel())
    assert proto.gallery_labels[-1] == tinyface.DISTRACTOR_LABEL
    stems = [os.path.splitext(os.path.basename(proto.image_paths[r]))[0] for r in proto.probe_rows]
    assert stems == [os.path.splitext(n)[0] for n in p_names]
    # the .mat ids and the file-name identities define the same mates
    p_file = np.array([int(n.split("_")[0]) for n in p_names])
    g_file = np.array([int(n.split("_")[0]) for n in g_names])
    np.testing.assert_array_equal(proto.probe_labels[:, None] == proto.gallery_labels[None, :-1],
                                  p_file[:, None] == g_file[None, :])
