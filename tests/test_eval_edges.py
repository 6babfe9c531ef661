"""`adaface-jax evaluate` robust edges: one-line errors, NaN rows, pair/label counts, exact ties in
IJB scores, a feature cache keyed on what determines the features, TinyFace protocol .mat files."""
import json
import os
import shutil
import types

import cv2
import numpy as np
import pytest
import scipy.io
from sklearn.metrics import roc_curve

from evaluation import ProtocolError, ijb, ranking, tinyface, verification
from tests.eval_fixtures import FEATS, LM, TID_MID, make_tree, small_meta, write_meta

PREFIX = "adaface-jax evaluate: error: "


def run_cli(argv):
    from adaface_jax.cli import main
    return main(["evaluate"] + argv)


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    return lines[0]


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _hq(seed=0, n_pairs=20, dim=8):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(2 * n_pairs, dim)).astype(np.float32)
    issame = np.tile([True, False], n_pairs // 2)
    f[1::2][issame] = f[0::2][issame] + 0.4 * f[1::2][issame]
    return _unit(f), issame


def _no_model(monkeypatch):
    """Any model load fails the test: input errors must come before it."""
    import adaface_jax.inference as inference

    def boom(path):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(inference, "load_pretrained", boom)


# ------------------------------------------------------------------------------------ one-line errors


def _hq_npz(path, **over):
    f, i = _hq()
    arrays = dict(names=np.array(["lfw"]), features_lfw=f, norms_lfw=np.ones((40, 1)), issame_lfw=i)
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("case, expect", [
    ("missing_key", "f.npz: missing array 'issame_lfw'"),
    ("odd_rows", "f.npz: features_lfw: 39 rows; expected an even number"),
    ("label_count", "f.npz: features_lfw: 40 rows make 20 pairs but there are 19 issame labels"),
    ("not_npz", "f.npz: not a readable .npz features file"),
    ("npy", "f.npy: a single .npy array, not an .npz archive"),
])
def test_hq_features_file_errors(tmp_path, capsys, case, expect):
    f, i = _hq()
    path = tmp_path / "f.npz"
    if case == "missing_key":
        _hq_npz(path, issame_lfw=None)
    elif case == "odd_rows":
        _hq_npz(path, features_lfw=f[:39])
    elif case == "label_count":
        _hq_npz(path, issame_lfw=i[:19])
    elif case == "not_npz":
        path.write_text("name,feature\nx,1\n")
    else:
        path = tmp_path / "f.npy"
        np.save(path, f)
    out = tmp_path / "deep" / "out"
    assert run_cli(["--protocol", "hq", "--features", str(path), "--out", str(out)]) == 1
    assert expect in one_error_line(capsys)
    assert not (tmp_path / "deep").exists()  # nothing half-written


def test_hq_bin_errors_come_before_the_model(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    base = ["--protocol", "hq", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]
    assert run_cli(base + ["--bin", str(tmp_path / "nope.bin")]) == 1
    assert "nope.bin: no such file" in one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no bins here")
    assert run_cli(base + ["--data", str(empty)]) == 1
    line = one_error_line(capsys)
    assert f"--data {empty}: no .bin file" in line
    (tmp_path / "bad.bin").write_bytes(b"\x80\x04garbage, not a pickle")
    assert run_cli(base + ["--bin", str(tmp_path / "bad.bin")]) == 1
    assert "bad.bin" in one_error_line(capsys)
    assert run_cli(base[:2] + ["--checkpoint", str(tmp_path / "missing_ckpt"), "--bin", str(tmp_path / "bad.bin")]) == 1
    assert "missing_ckpt: no such file or folder" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def _ijb_npz(path, feats=FEATS):
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    np.savez(path, features=feats / norms, norms=norms, fusion=np.array("pre_norm_vector_add"),
             flip_test=np.array(True))
    return str(path)


def test_ijb_protocol_folder_errors(tmp_path, capsys):
    npz = _ijb_npz(tmp_path / "f.npz")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    argv = ["--protocol", "ijbc", "--features", npz, "--out", str(tmp_path / "o")]
    assert run_cli(argv + ["--data", str(wrong)]) == 1
    line = one_error_line(capsys)
    assert "IJBC: missing meta file" in line and "ijbc_name_5pts_score.txt" in line
    # malformed lines name the file and the line
    root = tmp_path / "r1"
    write_meta(root, lm_lines=[f"{n.split()[0]} {LM}" for n in TID_MID], tid_mid=TID_MID,
               pairs=["10 20 1", "10 30"])
    assert run_cli(argv + ["--data", str(root)]) == 1
    assert "ijbc_template_pair_label.txt:2: expected 3 fields" in one_error_line(capsys)
    root = tmp_path / "r2"
    write_meta(root, lm_lines=[f"{n.split()[0]} {LM}" for n in TID_MID[:-1]] + ["h.jpg 1 2 3"], tid_mid=TID_MID,
               pairs=["10 20 1"])
    assert run_cli(argv + ["--data", str(root)]) == 1
    assert "ijbc_name_5pts_score.txt:8: expected 12 space-separated fields" in one_error_line(capsys)
    root = tmp_path / "r3"
    small_meta(root, probe=["20,100,d.jpg", "oops"])
    assert run_cli(argv + ["--data", str(root)]) == 1
    assert "ijbc_1N_probe_mixed.csv:3" in one_error_line(capsys)
    # features with the wrong row count
    small_meta(tmp_path / "r4")
    npz7 = _ijb_npz(tmp_path / "f7.npz", FEATS[:7])
    assert run_cli(["--protocol", "ijbc", "--features", npz7, "--data", str(tmp_path / "r4"),
                    "--out", str(tmp_path / "o")]) == 1
    assert "f7.npz: features: 7 rows but the protocol has 8 images" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_out_is_a_file(tmp_path, capsys):
    npz = _hq_npz(tmp_path / "f.npz")
    (tmp_path / "o").write_text("x")
    assert run_cli(["--protocol", "hq", "--features", npz, "--out", str(tmp_path / "o")]) == 1
    assert "exists and is not a folder" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------- pair counts


def test_pair_and_label_counts_must_match():
    f, i = _hq()
    with pytest.raises(ProtocolError, match="20 pairs of embeddings but 19 issame labels"):
        verification.calculate_roc(verification.THRESHOLDS, f[0::2], f[1::2], i[:19])
    with pytest.raises(ProtocolError, match="20 pairs of embeddings but 21 issame labels"):
        verification.calculate_val(verification.VAL_THRESHOLDS, f[0::2], f[1::2], np.r_[i, True], 1e-3)


# ------------------------------------------------------------------------------------------- NaN rows


def test_hq_nan_rows_refused_then_dropped(tmp_path, capsys):
    f, i = _hq()
    f[[3, 30]] = np.nan  # pairs 1 and 15
    npz = _hq_npz(tmp_path / "f.npz", features_lfw=f)
    argv = ["--protocol", "hq", "--features", npz, "--out", str(tmp_path / "o"), "--nrof-folds", "3"]
    assert run_cli(argv) == 1
    line = one_error_line(capsys)
    assert "features_lfw: 2 of 40 feature rows are NaN/inf (rows 3, 30)" in line and "--drop-nan" in line
    assert run_cli(argv + ["--drop-nan"]) == 0
    assert "left out" in capsys.readouterr().out
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]["sets"]["lfw"]
    assert res["dropped_nan_rows"] == 2 and res["dropped_pairs"] == 2
    keep = np.ones(20, bool)
    keep[[1, 15]] = False
    # independent reference: the 18 remaining pairs, squared distance, best of 400 thresholds per fold
    e1, e2, same = f[0::2][keep], f[1::2][keep], i[keep]
    dist = np.sum((e1 - e2) ** 2, 1)
    accs = []
    for test in (slice(0, 6), slice(6, 12), slice(12, 18)):
        train = np.ones(18, bool)
        train[test] = False
        tr = [np.mean((dist[train] < t) == same[train]) for t in verification.THRESHOLDS]
        t_best = verification.THRESHOLDS[int(np.argmax(tr))]
        accs.append(np.mean((dist[test] < t_best) == same[test]))
    assert res["accuracy"] == pytest.approx(np.mean(accs))


def test_ijb_nan_rows_refused_then_dropped(tmp_path, capsys):
    small_meta(tmp_path)
    feats = FEATS.copy()
    feats[3] = np.nan  # d.jpg: the only image of template 20 (pairs 10-20, 20-30; probe 20)
    npz = _ijb_npz(tmp_path / "f.npz", feats)
    argv = ["--protocol", "ijbc", "--features", npz, "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert run_cli(argv) == 1
    assert "f.npz: 1 of 8 feature rows are NaN/inf (rows 3)" in one_error_line(capsys)
    assert run_cli(argv + ["--drop-nan"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert res["dropped_nan_rows"] == 1 and res["dropped_templates"] == 1 and res["dropped_pairs"] == 2
    assert res["identification"]["dropped_probe_templates"] == 1 and res["identification"]["num_probes"] == 1
    # reference: the remaining 4 pairs scored by hand-pooled templates (image features = rows as given)
    tpl = {10: (FEATS[0] + FEATS[1]) / 2 + FEATS[2], 30: (FEATS[4] + FEATS[5]) / 2, 40: FEATS[6], 50: FEATS[7]}
    tpl = {k: v / np.linalg.norm(v) for k, v in tpl.items()}
    pairs = [(10, 30, 0), (40, 50, 1), (10, 40, 0), (30, 50, 1)]
    scores = np.array([tpl[a] @ tpl[b] for a, b, _ in pairs])
    fpr, tpr, _ = roc_curve([p[2] for p in pairs], scores)
    for far, got in res["verification"]["tar_at_far"].items():
        assert got == pytest.approx(np.flipud(tpr)[np.argmin(np.abs(np.flipud(fpr) - float(far)))])
    # probe 50 (subject 400) vs gallery {10, 30, 40}: its mate 40 must be rank 1 iff it scores highest
    s50 = {t: tpl[50] @ tpl[t] for t in (10, 30, 40)}
    assert res["identification"]["rank"]["1"] == float(max(s50, key=s50.get) == 40)


def test_tinyface_nan_rows_dropped(tmp_path, capsys):
    make_tree(tmp_path, ["1_p.jpg", "2_p.jpg", "3_p.jpg"], ["1_g.jpg", "2_g.jpg", "3_g.jpg"], ["x.jpg"])
    proto = tinyface.build_protocol(str(tmp_path))
    rng = np.random.default_rng(3)
    f = rng.normal(size=(7, 4)).astype(np.float32)
    bad_row = proto.probe_rows[1]
    f[bad_row] = np.nan
    np.savez(tmp_path / "f.npz", features=f, norms=np.ones((7, 1)))
    argv = ["--protocol", "tinyface", "--features", str(tmp_path / "f.npz"), "--data", str(tmp_path),
            "--out", str(tmp_path / "o")]
    assert run_cli(argv) == 1
    assert f"1 of 7 feature rows are NaN/inf (rows {bad_row})" in one_error_line(capsys)
    assert run_cli(argv + ["--drop-nan"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert res["dropped_nan_rows"] == 1 and res["dropped_probes"] == 1 and res["dropped_gallery"] == 0
    hits = []
    for i in (0, 2):  # the probes left
        s = f[proto.gallery_rows] @ f[proto.probe_rows[i]]
        hits.append(proto.gallery_labels[int(np.argmax(s))] == proto.probe_labels[i])
    assert res["rank"]["1"] == pytest.approx(np.mean(hits))


def test_ijbs_nan_rows_dropped(tmp_path, capsys):
    from evaluation import ijbs
    from tests.eval_fixtures import IMAGES, write_protocol
    proto = write_protocol(tmp_path / "protocol")
    (tmp_path / "image_list_mtcnn_fail_skipped_v1.csv").write_text(
        ",path\n" + "".join(f"{i},{x}\n" for i, x in enumerate(IMAGES)))
    raw = np.random.default_rng(1).normal(size=(len(IMAGES), 6)).astype(np.float32)
    n = np.linalg.norm(raw, axis=1, keepdims=True)
    feats, norms = raw / n, n.copy()
    norms[1] = np.nan  # 1/videos_100_5.jpg: one of two frames of video template (1, 100)
    np.savez(tmp_path / "s.npz", features=feats, norms=norms, flip_test=np.array(False))
    argv = ["--protocol", "ijbs", "--features", str(tmp_path / "s.npz"), "--data", str(tmp_path),
            "--out", str(tmp_path / "o")]
    assert run_cli(argv) == 1
    assert "s.npz: 1 of 11 feature rows are NaN/inf (rows 1)" in one_error_line(capsys)
    assert run_cli(argv + ["--drop-nan"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert res["dropped_nan_rows"] == 1
    keep = [i for i in range(len(IMAGES)) if i != 1]
    ref = ijbs.evaluate(proto, [IMAGES[i] for i in keep], raw[keep])
    for name, r in ref.items():
        assert [res[name]["rank"][str(k)] for k in r["rank"]] == pytest.approx(list(r["rank"].values()))


# ------------------------------------------------------------------------------------------ exact ties


def _original_pair_scores(t_feats, r1, r2):
    """The original's 1:1 scoring (§2.5): np.sum(feat1 * feat2, -1) in batches of 100000 pairs."""
    out = np.zeros(r1.size, np.float32)
    for s in range(0, r1.size, 100000):
        out[s:s + 100000] = np.sum(t_feats[r1[s:s + 100000]] * t_feats[r2[s:s + 100000]], -1)
    return out


def _original_tar(labels, scores):
    fpr, tpr, _ = roc_curve(labels, scores)
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


# ------------------------------------------------------------------------------------------ the cache


class _Tiny:
    """A tiny (emb, norm) model; load_pretrained(dir) returns the weights of the LATEST step in
    <dir>/checkpoints/<step>/w.npy, like a training workdir (new steps don't touch <dir>'s mtime)."""

    @staticmethod
    def make():
        import flax.linen as nn
        import jax.numpy as jnp

        class Tiny(nn.Module):
            @nn.compact
            def __call__(self, x, train=False):
                x = jnp.mean(x.reshape(x.shape[0], 16, 7, 16, 7, 3), axis=(2, 4)).reshape(x.shape[0], -1)
                x = nn.Dense(8, use_bias=False)(x)
                n = jnp.linalg.norm(x, axis=-1, keepdims=True)
                return x / n, n
        return Tiny()


def _write_step(workdir, step, seed):
    d = workdir / "checkpoints" / str(step)
    d.mkdir(parents=True)
    np.save(d / "w.npy", np.random.default_rng(seed).normal(size=(768, 8)).astype(np.float32))


def _load(workdir, module):
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    w = np.load(os.path.join(workdir, "checkpoints", str(steps[-1]), "w.npy"))
    return types.SimpleNamespace(module=module, variables={"params": {"Dense_0": {"kernel": w}}}, arch="tiny")


def _write_lfw(folder, seed):
    from data_pipeline.bin_reader import write_bin
    folder.mkdir(parents=True)
    imgs = np.random.default_rng(seed).integers(0, 256, (20, 112, 112, 3), dtype=np.uint8)
    write_bin(str(folder / "lfw.bin"), [cv2.imencode(".png", im)[1].tobytes() for im in imgs], [True, False] * 5)
    return imgs


def test_feature_cache_is_keyed_on_weights_and_images(tmp_path, monkeypatch):
    import adaface_jax.inference as inference
    from adaface_jax import features

    module = _Tiny.make()
    monkeypatch.setattr(inference, "load_pretrained", lambda path: _load(path, module))
    calls = []
    real = features.make_embed_fn

    def counting(*a, **k):
        fn = real(*a, **k)

        def wrapped(variables, images):
            calls.append(images.shape[0])
            return fn(variables, images)
        return wrapped
    monkeypatch.setattr(features, "make_embed_fn", counting)

    work = tmp_path / "work"
    _write_step(work, 1, seed=1)
    imgs_a = _write_lfw(tmp_path / "a", seed=10)
    imgs_b = _write_lfw(tmp_path / "b", seed=11)
    cache = tmp_path / "cache"

    def run(data, tag):
        saved = tmp_path / f"{tag}.npz"
        assert run_cli(["--protocol", "hq", "--checkpoint", str(work), "--data", str(data), "--out",
                        str(tmp_path / tag), "--batch-size", "32", "--nrof-folds", "2", "--cache-dir", str(cache),
                        "--save-features", str(saved)]) == 0
        return np.load(saved)["features_lfw"]

    def direct(imgs):
        m = _load(work, module)
        return real(module, True, "pre_norm_vector_add")(m.variables, imgs.astype(np.uint8))[0]

    def cache_files():
        return set(cache.glob("*.npz"))

    fa = run(tmp_path / "a", "r1")
    assert len(calls) == 1
    np.testing.assert_allclose(fa, direct(imgs_a), atol=1e-6)
    file_a1 = cache_files()
    fb = run(tmp_path / "b", "r2")  # same checkpoint, another lfw.bin: fresh features
    assert len(calls) == 2
    np.testing.assert_allclose(fb, direct(imgs_b), atol=1e-6)
    (file_b1,) = cache_files() - file_a1
    fa2 = run(tmp_path / "a", "r3")  # unchanged rerun: a cache hit
    assert len(calls) == 2
    np.testing.assert_array_equal(fa2, fa)
    mtime = os.stat(work).st_mtime_ns
    before = cache_files()
    _write_step(work, 2, seed=2)  # a new checkpoint in the workdir
    assert os.stat(work).st_mtime_ns == mtime
    fa3 = run(tmp_path / "a", "r4")
    assert len(calls) == 3
    np.testing.assert_allclose(fa3, direct(imgs_a), atol=1e-6)
    assert not np.allclose(fa3, fa)
    # the key is verified on a hit: another key's arrays under this file name are not returned
    (file_a2,) = cache_files() - before
    shutil.copy(file_b1, file_a2)
    fa4 = run(tmp_path / "a", "r5")
    assert len(calls) == 4
    np.testing.assert_array_equal(fa4, fa3)


# ------------------------------------------------------------------------------------ TinyFace .mat


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


@pytest.mark.parametrize("content, expect", [
    ("garbage", "probe_img_ID_pairs.mat: not a readable MATLAB .mat file"),
    ("wrong_keys", "probe_img_ID_pairs.mat: missing variable(s) ['probe_set']"),
    ("count", "probe_img_ID_pairs.mat: 'probe_set' has 2 entries and 'probe_ids' 3"),
])
def test_tinyface_malformed_mat_is_one_error(tmp_path, capsys, content, expect):
    make_tree(tmp_path, ["1_p.jpg", "2_p.jpg"], ["1_g.jpg", "2_g.jpg"], [])
    mat_dir = tmp_path / "tinyface" / "Testing_Set"
    names = np.empty((2, 1), object)
    names[0, 0], names[1, 0] = np.array(["1_p.jpg"]), np.array(["2_p.jpg"])
    g_names = np.empty((2, 1), object)
    g_names[0, 0], g_names[1, 0] = np.array(["1_g.jpg"]), np.array(["2_g.jpg"])
    scipy.io.savemat(mat_dir / "gallery_match_img_ID_pairs.mat",
                     {"gallery_set": g_names, "gallery_ids": np.array([[1], [2]], np.uint16)})
    target = mat_dir / "probe_img_ID_pairs.mat"
    if content == "garbage":
        target.write_bytes(b"MATLAB 5.0 MAT-file, truncated" + b"\0" * 10)
    elif content == "wrong_keys":
        scipy.io.savemat(target, {"probe_ids": np.array([[1], [2]])})
    else:
        scipy.io.savemat(target, {"probe_set": names, "probe_ids": np.array([[1], [2], [3]])})
    np.savez(tmp_path / "f.npz", features=np.ones((4, 3), np.float32))
    assert run_cli(["--protocol", "tinyface", "--features", str(tmp_path / "f.npz"), "--data", str(tmp_path),
                    "--out", str(tmp_path / "o")]) == 1
    assert expect in one_error_line(capsys)


# ------------------------------------------------------------------------------------- IJB 1:N files


def _gn(name):
    """The 1:N file names of the IJB-C fixture."""
    g1, g2 = ijb.GALLERY_NAMES["IJBC"]
    return {"gallery1": f"ijbc_1N_gallery_{g1}.csv", "gallery2": f"ijbc_1N_gallery_{g2}.csv",
            "probe": "ijbc_1N_probe_mixed.csv"}[name]


def test_ijb_some_but_not_all_1n_files_is_an_error_naming_the_missing_one(tmp_path, capsys):
    small_meta(tmp_path)
    (tmp_path / "IJBC" / "meta" / _gn("gallery2")).unlink()
    npz = _ijb_npz(tmp_path / "f.npz")
    argv = ["--protocol", "ijbc", "--features", npz, "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert run_cli(argv) == 1
    line = one_error_line(capsys)
    assert _gn("gallery2") in line and "missing" in line
    assert _gn("gallery1") not in line and _gn("probe") not in line  # only the missing one is named
    assert not (tmp_path / "o").exists()
    # verification only, when asked for
    assert run_cli(argv + ["--identification", "skip"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert "rank" not in res["identification"] and res["identification"]["missing_files"] == []
    assert not (tmp_path / "o" / "identification_result.csv").exists()


def test_ijb_without_any_1n_file_skips_identification_naming_the_expected_files(tmp_path, capsys):
    small_meta(tmp_path, g1=None, g2=None, probe=None)
    npz = _ijb_npz(tmp_path / "f.npz")
    argv = ["--protocol", "ijbc", "--features", npz, "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert run_cli(argv) == 0
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if "identification" in line]
    assert len(note) == 1 and "skipped identification" in note[0]
    for key in ("gallery1", "gallery2", "probe"):
        assert _gn(key) in note[0]
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    expected = [str(tmp_path / "IJBC" / "meta" / _gn(k)) for k in ("gallery1", "gallery2", "probe")]
    assert res["identification"]["missing_files"] == expected
    assert "no 1:N files" in res["identification"]["skipped"]
    assert not (tmp_path / "o" / "identification_result.csv").exists()
    # asked for explicitly: an error naming the files, nothing written
    assert run_cli(argv[:-1] + [str(tmp_path / "o2"), "--identification", "require"]) == 1
    line = one_error_line(capsys)
    assert "identification asked for" in line and all(_gn(k) in line for k in ("gallery1", "gallery2", "probe"))
    assert not (tmp_path / "o2").exists()


def test_identification_option_is_for_ijb_only(tmp_path, capsys):
    npz = _hq_npz(tmp_path / "f.npz")
    assert run_cli(["--protocol", "hq", "--features", npz, "--out", str(tmp_path / "o"),
                    "--identification", "require"]) == 1
    assert "--identification applies to --protocol ijbb/ijbc" in one_error_line(capsys)


# ------------------------------------------------------------------------------------- the --out folder


def test_out_that_is_not_an_earlier_run_is_never_overwritten(tmp_path, capsys):
    npz = _hq_npz(tmp_path / "f.npz")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "hq_result.csv").write_text("my own table\n")
    assert run_cli(["--protocol", "hq", "--features", npz, "--out", str(mine)]) == 1
    line = one_error_line(capsys)
    assert str(mine) in line and "hq_result.csv" in line and "not the folder of an earlier" in line
    assert (mine / "hq_result.csv").read_text() == "my own table\n"
    assert sorted(p.name for p in mine.iterdir()) == ["hq_result.csv"]
    # a results.json that is not one of ours is not an earlier run either
    (mine / "hq_result.csv").unlink()
    (mine / "results.json").write_text('{"mine": true}')
    assert run_cli(["--protocol", "hq", "--features", npz, "--out", str(mine)]) == 1
    assert "results.json" in one_error_line(capsys)
    assert (mine / "results.json").read_text() == '{"mine": true}'
    # a folder with other files that the run does not write is fine
    (mine / "results.json").unlink()
    (mine / "notes.txt").write_text("keep")
    assert run_cli(["--protocol", "hq", "--features", npz, "--out", str(mine)]) == 0
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "results.json").exists()


def test_an_earlier_run_is_replaced_whole_with_results_json_last(tmp_path, monkeypatch):
    from adaface_jax import io

    small_meta(tmp_path)
    npz = _ijb_npz(tmp_path / "f.npz")
    out = tmp_path / "o"
    argv = ["--protocol", "ijbc", "--features", npz, "--data", str(tmp_path), "--out", str(out)]
    assert run_cli(argv) == 0
    assert (out / "identification_result.csv").exists()
    (out / "notes.txt").write_text("keep")
    events = []
    real_copy, real_remove = io.copy, io.remove

    def copy(src, dst):
        events.append(("copy", os.path.basename(dst), (out / "results.json").exists()))
        return real_copy(src, dst)

    def remove(path):
        events.append(("remove", os.path.basename(path), None))
        return real_remove(path)
    monkeypatch.setattr(io, "copy", copy)
    monkeypatch.setattr(io, "remove", remove)
    assert run_cli(argv + ["--identification", "skip"]) == 0
    copies = [e for e in events if e[0] == "copy"]
    assert copies[-1][1] == "results.json"
    assert events.index(("remove", "results.json", None)) < events.index(copies[0])
    assert not any(had_results for _, _, had_results in copies)  # never a results.json beside new files
    # the earlier run's identification table is gone (this run skipped it); other files stay
    assert not (out / "identification_result.csv").exists()
    assert (out / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json", "verification_result.csv",
                                                     "verification_roc.png"]


@pytest.mark.parametrize("flag", ["--out", "--features", "--data", "--cache-dir", "--save-features", "--bin"])
@pytest.mark.parametrize("url", ["s4://bucket/x", "gs:/bucket/x"])
def test_every_path_refuses_an_unknown_scheme_or_a_one_slash_url(tmp_path, capsys, monkeypatch, flag, url):
    monkeypatch.chdir(tmp_path)
    npz = _hq_npz(tmp_path / "f.npz")
    argv = {"--out": ["--features", npz, "--out", url], "--features": ["--features", url],
            "--data": ["--features", npz, "--data", url], "--cache-dir": ["--features", npz, "--cache-dir", url],
            "--save-features": ["--features", npz, "--save-features", url],
            "--bin": ["--checkpoint", str(tmp_path), "--bin", url]}[flag]
    assert run_cli(["--protocol", "hq", *argv, *([] if flag == "--out" else ["--out", str(tmp_path / "o")])]) == 1
    line = one_error_line(capsys)
    assert flag in line and url in line
    assert ("unsupported URL scheme 's4:'" if url.startswith("s4") else "two slashes") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz"]  # no 's4:' or 'gs:' folder, no output
