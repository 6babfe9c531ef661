"""`adaface-jax evaluate`: every protocol from a features file or a checkpoint, against independent references (the
PyTorch network, sklearn, hand-pooled templates, brute force); ties and unknown templates; NaN rows; the feature
cache; one-line errors with nothing half-written; an earlier --out replaced whole."""
import csv
import json
import os
import shutil
import types

import cv2
import numpy as np
import pytest
import scipy.io
from sklearn.metrics import roc_curve

from adaface_jax.cli import main
from evaluation import ijb, ijbs, tinyface, verification
from tests.support import cli_output
from tests.support.eval_fixtures import FEATS, IMAGES, LM, TID_MID, make_tree, small_meta, write_meta, write_protocol
from tests.support.reference_embeddings import torch_embed_bgr as _torch_embed
from tests.support.verification_pairs import verification_pairs as _hq



def run_cli(argv):
    return main(["evaluate"] + argv)


def one_error_line(capsys, command="evaluate", *needles):
    """The one error line of `evaluate` (see tests/support/cli_output.py)."""
    return cli_output.one_error_line(capsys, command, *needles)


def _results(out):
    return json.loads((out / "results.json").read_text())["results"]


def _hq_npz(path, **over):
    f, i = _hq()
    arrays = dict(names=np.array(["lfw"]), features_lfw=f, norms_lfw=np.ones((40, 1)), issame_lfw=i)
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return str(path)


def _ijb_npz(path, feats=FEATS):
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    np.savez(path, features=feats / norms, norms=norms, fusion=np.array("pre_norm_vector_add"),
             flip_test=np.array(True))
    return str(path)


def _ijb_features(tmp_path, feats):
    path = tmp_path / "ijb_feats.npz"
    np.savez(path, features=feats, norms=np.ones((len(feats), 1), np.float32), fusion=np.array("pre_norm_vector_add"),
             flip_test=np.array(False))
    return str(path)


def _no_model(monkeypatch):
    """Any model load fails the test: input errors must come before it."""
    import adaface_jax.inference as inference

    def boom(path):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(inference, "load_pretrained", boom)


# features files and checkpoints, every protocol


def test_hq_features_file(tmp_path, capsys):
    (fa, ia), (fb, ib) = _hq(0), _hq(1)
    npz = tmp_path / "feats.npz"
    np.savez(npz, names=np.array(["lfw", "cfp_fp"]), features_lfw=fa, norms_lfw=np.ones((40, 1)), issame_lfw=ia,
             features_cfp_fp=fb, norms_cfp_fp=np.ones((40, 1)), issame_cfp_fp=ib)
    out = tmp_path / "out"
    assert run_cli(["--protocol", "hq", "--features", str(npz), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    _, _, acc, thr = verification.evaluate(fa, ia)
    assert res["results"]["sets"]["lfw"]["accuracy"] == pytest.approx(acc.mean())
    assert res["results"]["sets"]["lfw"]["best_threshold"] == pytest.approx(thr.mean())
    assert res["results"]["mean_accuracy"] == pytest.approx((acc.mean() + verification.evaluate(fb, ib)[2].mean()) / 2)
    assert (out / "hq_roc.png").stat().st_size > 1000
    assert "lfw" in capsys.readouterr().out


def test_the_library_call_returns_what_results_json_holds(tmp_path):
    from adaface_jax.errors import InputError
    from adaface_jax.evaluate import EvaluationRequest, run_evaluation

    f, issame = _hq(2)
    npz = tmp_path / "feats.npz"
    np.savez(npz, names=np.array(["lfw"]), features_lfw=f, norms_lfw=np.ones((40, 1)), issame_lfw=issame)
    out = tmp_path / "out"
    summary = run_evaluation(EvaluationRequest("hq", features=str(npz), out=str(out), nrof_folds=5))
    assert summary == json.loads((out / "results.json").read_text())
    want = verification.evaluate(f, issame, nrof_folds=5)[2].mean()
    assert summary["results"]["mean_accuracy"] == pytest.approx(want)
    # what argparse refuses for the command, the library refuses in one line, before any output
    for bad, message in ((dict(protocol="lfw", features=str(npz)), "--protocol 'lfw': expected one of hq, "),
                         (dict(protocol="hq"), "give exactly one of --checkpoint and --features"),
                         (dict(protocol="hq", features=str(npz), fusion="max"), "--fusion 'max': expected one of ")):
        with pytest.raises(InputError, match=message):
            run_evaluation(EvaluationRequest(**bad, out=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()


def test_hq_checkpoint_path_with_tiny_model(tmp_path, monkeypatch):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from data_pipeline.bin_reader import write_bin

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Dense(8)(jnp.mean(x.reshape(x.shape[0], 16, 7, 16, 7, 3), axis=(2, 4)).reshape(x.shape[0], -1))
            n = jnp.linalg.norm(x, axis=-1, keepdims=True)
            return x / n, n

    module = Tiny()
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)))
    import adaface_jax.inference as inference
    monkeypatch.setattr(inference, "load_pretrained",
                        lambda path: types.SimpleNamespace(module=module, variables=variables, arch="tiny"))
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 112, 112, 3), dtype=np.uint8)
    bins = [cv2.imencode(".png", im)[1].tobytes() for im in imgs]
    issame = [True, False] * 5
    write_bin(str(tmp_path / "lfw.bin"), bins, issame)
    out = tmp_path / "out"
    feats_file = tmp_path / "saved.npz"
    (tmp_path / "ckpt").mkdir()  # load_pretrained is patched; the path must exist
    assert run_cli(["--protocol", "hq", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path),
                    "--out", str(out), "--batch-size", "8", "--save-features", str(feats_file),
                    "--cache-dir", str(tmp_path / "cache")]) == 0
    from adaface_jax.features import extract_features
    f, _ = extract_features(module, variables, imgs, batch_size=8, progress=False)
    saved = np.load(feats_file)
    np.testing.assert_allclose(saved["features_lfw"], f, atol=1e-6)
    res = json.loads((out / "results.json").read_text())
    assert res["results"]["sets"]["lfw"]["accuracy"] == pytest.approx(verification.evaluate(f, np.array(issame))[2].mean())
    # the saved file scores identically through --features
    out2 = tmp_path / "out2"
    assert run_cli(["--protocol", "hq", "--features", str(feats_file), "--out", str(out2)]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["results"]["sets"] == res["results"]["sets"]


def test_ijbc_features_file(tmp_path):
    meta = small_meta(tmp_path)
    npz = tmp_path / "ijbc.npz"
    norms = np.linalg.norm(FEATS, axis=1, keepdims=True)
    np.savez(npz, features=FEATS / norms, norms=norms, fusion=np.array("pre_norm_vector_add"), flip_test=np.array(True))
    out = tmp_path / "out"
    assert run_cli(["--protocol", "ijbc", "--features", str(npz), "--data", str(tmp_path), "--out", str(out)]) == 0
    rows = list(csv.reader(open(out / "verification_result.csv")))
    assert rows[0] == ["Methods", "1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
    ver = ijb.verification_11(meta, FEATS)
    assert rows[1] == ["ijbc-IJBC"] + [f"{v * 100:.2f}" for v in ver["tar_at_far"].values()]
    ident = list(csv.reader(open(out / "identification_result.csv")))
    assert ident[0] == ["", "top1", "top5", "top10"]
    assert float(ident[1][1]) == pytest.approx(ijb.identification_1n(meta, FEATS)["rank"][1])
    assert (out / "verification_roc.png").exists()


def test_tinyface_and_ijbs_features_files(tmp_path):
    make_tree(tmp_path / "tf", ["1_p.jpg", "2_p.jpg"], ["1_g.jpg", "2_g.jpg"], ["x.jpg"])
    proto = tinyface.build_protocol(str(tmp_path / "tf"))
    f = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.savez(tmp_path / "tf.npz", features=f, norms=np.ones((5, 1)))
    assert run_cli(["--protocol", "tinyface", "--features", str(tmp_path / "tf.npz"), "--data", str(tmp_path / "tf"),
                    "--out", str(tmp_path / "o1")]) == 0
    rows = list(csv.reader(open(tmp_path / "o1" / "result.csv")))
    assert rows[0] == ["rank", "values"]
    assert float(rows[1][1]) == pytest.approx(tinyface.evaluate(f, proto)[1])

    pdir = tmp_path / "ijbs" / "protocol"
    p = write_protocol(pdir)
    (tmp_path / "ijbs" / "image_list_mtcnn_fail_skipped_v1.csv").write_text(
        ",path\n" + "".join(f"{i},{x}\n" for i, x in enumerate(IMAGES)))
    raw = np.random.default_rng(1).normal(size=(len(IMAGES), 6)).astype(np.float32)
    n = np.linalg.norm(raw, axis=1, keepdims=True)
    np.savez(tmp_path / "s.npz", features=raw / n, norms=n, flip_test=np.array(False))
    assert run_cli(["--protocol", "ijbs", "--features", str(tmp_path / "s.npz"), "--data", str(tmp_path / "ijbs"),
                    "--out", str(tmp_path / "o2")]) == 0
    text = (tmp_path / "o2" / "pre_norm_vector_add_cos_result.csv").read_text().splitlines()
    ref = ijbs.evaluate(p, IMAGES, raw)
    assert text[0] == "surveillance_to_single,rank1,rank5,rank10"
    assert [float(v) for v in text[1].split(",")[1:]] == pytest.approx(list(ref["surveillance_to_single"]["rank"].values()))


def _random_faces(n, seed):
    bgr = np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    bgr[:, :, :40] //= 2  # not mirror-symmetric
    return bgr


@pytest.mark.parametrize("protocol", ["ijbc", "ijbs", "tinyface"])
def test_evaluate_checkpoint_embeds_like_the_pytorch_reference(converted_ir18, tmp_path, protocol):
    """`evaluate --checkpoint` on a tiny on-disk protocol: the features it extracts (--save-features) are the
    PyTorch reference's (flip-fused for IJB-C and TinyFace, raw for IJB-S), and its results are what the
    same features give through `evaluate --features`."""
    from tests.support.eval_fixtures import IMAGES, TID_MID, make_tree, small_meta, write_protocol  # noqa: PLC0415
    ckpt, tm = converted_ir18
    data = tmp_path / "data"
    flip = protocol != "ijbs"
    if protocol == "ijbc":
        crops = data / "IJBC" / "loose_crop"
        crops.mkdir(parents=True)
        for name, img in zip((n.split()[0] for n in TID_MID), _random_faces(len(TID_MID), 1)):
            cv2.imwrite(str(crops / name), cv2.resize(img, (130, 150)))
        from evaluation import ijb  # noqa: PLC0415
        from adaface_jax.align import iter_warped_crops  # noqa: PLC0415
        faces = np.stack(list(iter_warped_crops(ijb.crop_paths(small_meta(data)), small_meta(data).landmarks)))  # alignment is tested in test_eval_ijb
    elif protocol == "ijbs":
        write_protocol(data / "protocol")
        (data / "image_list_mtcnn_fail_skipped_v1.csv").write_text(
            ",path\n" + "".join(f"{i},{x}\n" for i, x in enumerate(IMAGES)))
        faces = _random_faces(len(IMAGES), 2)
        for rel, img in zip(IMAGES, faces):
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(data / rel), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
        faces = np.stack([cv2.imread(str(data / rel)) for rel in IMAGES])
    else:
        make_tree(data, ["1_p.png", "2_p.png"], ["1_g.png", "2_g.png"], ["d_1.png"])
        from evaluation import tinyface  # noqa: PLC0415
        aligned = tinyface.build_protocol(str(data)).image_paths  # the feature row order (tested elsewhere)
        faces = _random_faces(len(aligned), 3)
        for p, img in zip(aligned, faces):
            cv2.imwrite(p, img)
    saved = tmp_path / "saved.npz"
    assert run_cli(["--protocol", protocol, "--checkpoint", ckpt, "--data", str(data), "--out", str(tmp_path / "a"),
                     "--save-features", str(saved), "--batch-size", "16"]) == 0
    z = np.load(saved)
    want_e, want_n = _torch_embed(tm, faces, flip)
    np.testing.assert_allclose(z["features"], want_e, atol=2e-4)
    np.testing.assert_allclose(z["norms"].reshape(-1, 1), want_n, rtol=2e-4)
    assert bool(z["flip_test"]) == flip
    assert run_cli(["--protocol", protocol, "--features", str(saved), "--data", str(data), "--out",
                     str(tmp_path / "b")]) == 0
    assert _results(tmp_path / "a") == _results(tmp_path / "b")


# ties and unknown templates


def _pooled_templates(tid_mid, feats):
    """The reference template pooling by hand: mean over the images of each media, sum over media, L2."""
    rows = [line.split() for line in tid_mid]
    out = {}
    for t in sorted({int(r[1]) for r in rows}):
        media = {}
        for (_, tid, mid), f in zip(rows, feats):
            if int(tid) == t:
                media.setdefault(int(mid), []).append(f)
        v = sum(np.mean(fs, axis=0) for fs in media.values())
        out[t] = v / np.linalg.norm(v)
    return out


def test_ijb_unknown_templates_error_or_row0(tmp_path, capsys):
    from tests.support.eval_fixtures import FEATS, LM, TID_MID, write_meta  # noqa: PLC0415
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415
    pairs = ["10 20 1", "10 30 0", "20 30 0", "40 50 1", "10 40 0", "30 99 1", "30 50 1"]
    write_meta(tmp_path, "IJBC", lm_lines=[f"{n.split()[0]} {LM}" for n in TID_MID], tid_mid=TID_MID, pairs=pairs)
    feats = _ijb_features(tmp_path, FEATS)
    assert run_cli(["--protocol", "ijbc", "--features", feats, "--data", str(tmp_path), "--out",
                     str(tmp_path / "err")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ijbc_template_pair_label.txt" in err[0] and "99" in err[0], err
    assert run_cli(["--protocol", "ijbc", "--features", feats, "--data", str(tmp_path), "--out",
                     str(tmp_path / "row0"), "--unknown-templates", "row0"]) == 0
    tf = _pooled_templates(TID_MID, FEATS)
    first = min(tf)  # the reference looks an unknown id up as row 0 of the sorted template ids
    scores = [float(tf[int(a)] @ tf.get(int(b), tf[first])) for a, b, _ in (p.split() for p in pairs)]
    labels = [int(p.split()[2]) for p in pairs]
    assert _results(tmp_path / "row0")["verification"]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


@pytest.mark.parametrize("ds", ["IJBB", "IJBC"])
def test_ijb_identification_over_both_galleries_and_the_tie_option(tmp_path, ds):
    """Templates pool every image of the template (face_tid_mid).  With image c = [1,0]: template 10 (a, b, c)
    is [1,0], 30 (e, f) [0,1], 40 (g) [1,-1].  Probe 20 ([1,1]) scores 0.7071 against both 10 and 30 (first
    gallery file, in that order): a tie, and its mate is 10, so rank-1 is 2/2 (stable) or 1/2 (reversed).
    Probe 50 ([2,-1]) is nearest to its mate 40, which is only in the second gallery file (S2 for IJB-B, G2
    for IJB-C): a rank-1 hit only if both gallery files are read."""
    from tests.support.eval_fixtures import FEATS, LM, TID_MID, write_meta  # noqa: PLC0415
    write_meta(tmp_path, ds, lm_lines=[f"{n.split()[0]} {LM}" for n in TID_MID], tid_mid=TID_MID,
               pairs=["10 20 1", "10 30 0", "40 50 1"], g1=["10,100,a.jpg", "10,100,b.jpg", "30,300,e.jpg"],
               g2=["40,400,g.jpg"], probe=["20,100,d.jpg", "50,400,h.jpg"])
    feats = FEATS.copy()
    feats[2] = [1, 0]
    feats = _ijb_features(tmp_path, feats)
    got = {}
    for tie in ("stable", "reversed"):
        out = tmp_path / tie
        assert run_cli(["--protocol", ds.lower(), "--features", feats, "--data", str(tmp_path), "--out", str(out),
                         "--tie", tie]) == 0
        got[tie] = _results(out)["identification"]["rank"]
    assert got["stable"]["1"] == 1.0 and got["reversed"]["1"] == 0.5
    assert got["stable"]["5"] == got["reversed"]["5"] == 1.0


def test_tinyface_tie_and_collision_options(tmp_path, capsys):
    from tests.support.eval_fixtures import make_tree  # noqa: PLC0415
    make_tree(tmp_path, ["1_p.jpg", "2_p.jpg"], ["1_g.jpg", "2_g.jpg"], ["d_1.jpg"])
    # rows (sorted aligned paths): Probe 1_p, 2_p; Gallery_Match 1_g, 2_g; Gallery_Distractor d_1
    e = np.eye(3, dtype=np.float32)
    feats = np.stack([e[0], e[1], e[0], e[2], e[0]])  # probe 1 ties its mate 1_g with the distractor d_1
    np.savez(tmp_path / "tf.npz", features=feats, norms=np.ones((5, 1), np.float32))
    ranks = {}
    for tie in ("stable", "reversed"):
        out = tmp_path / tie
        assert run_cli(["--protocol", "tinyface", "--features", str(tmp_path / "tf.npz"), "--data", str(tmp_path),
                         "--out", str(out), "--tie", tie]) == 0
        ranks[tie] = _results(out)["rank"]
    # probe 2 ([0,1,0]) scores 0 against every gallery image: its mate 2_g is gallery index 1 of 3
    assert ranks["stable"]["1"] == 0.5 and ranks["reversed"]["1"] == 0.0
    assert ranks["stable"]["5"] == ranks["reversed"]["5"] == 1.0

    # a stem shared by a probe and a gallery image: an error naming both, or (reference) the last file wins
    root = tmp_path / "coll"
    make_tree(root, ["1_x.jpg", "2_p.jpg"], ["2_g.jpg"], ["1_x.jpg"])
    capsys.readouterr()
    np.savez(tmp_path / "c.npz", features=np.stack([e[0], e[1], e[1], e[0]]), norms=np.ones((4, 1), np.float32))
    assert run_cli(["--protocol", "tinyface", "--features", str(tmp_path / "c.npz"), "--data", str(root),
                     "--out", str(tmp_path / "c_err")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Probe/1_x.jpg" in err[0] and "Gallery_Distractor/1_x.jpg" in err[0], err
    assert run_cli(["--protocol", "tinyface", "--features", str(tmp_path / "c.npz"), "--data", str(root),
                     "--out", str(tmp_path / "c_last"), "--tinyface-on-collision", "last"]) == 0
    # rows: Probe 1_x (0), 2_p (1); Gallery_Match 2_g (2); Distractor 1_x (3).  "last": the probe 1_x is
    # read from row 3 ([1,0,0]); it has no mate (label 1 is only the distractor's stem), so only probe 2
    # counts, and 2_p ([0,1,0]) finds its mate 2_g ([0,1,0]) first.
    assert _results(tmp_path / "c_last")["rank"]["1"] == 1.0


# one-line errors


def test_evaluate_refuses_an_unsafe_checkpoint_in_one_line(files, tmp_path, capsys):
    import cv2

    from data_pipeline.bin_reader import write_bin

    face = cv2.imencode(".png", np.full((112, 112, 3), 128, np.uint8))[1].tobytes()
    write_bin(str(tmp_path / "lfw.bin"), [face] * 20, [True, False] * 5)
    argv = ["evaluate", "--protocol", "hq", "--checkpoint", str(files["evil"]), "--bin", str(tmp_path / "lfw.bin"),
            "--out", str(tmp_path / "res")]
    assert main(argv) == 1
    one_error_line(capsys, "evaluate", "evil.ckpt", "refusing to call")
    assert not files["sentinel"].exists() and not (tmp_path / "res").exists()


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


def test_identification_option_is_for_ijb_only(tmp_path, capsys):
    npz = _hq_npz(tmp_path / "f.npz")
    assert run_cli(["--protocol", "hq", "--features", npz, "--out", str(tmp_path / "o"),
                    "--identification", "require"]) == 1
    assert "--identification applies to --protocol ijbb/ijbc" in one_error_line(capsys)


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


# NaN rows


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
    from tests.support.eval_fixtures import IMAGES, write_protocol
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


# IJB 1:N files


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


# the feature cache


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
    real = features._batch_embed_fn

    def counting(*a, **k):
        fn = real(*a, **k)

        def wrapped(variables, images):
            calls.append(images.shape[0])
            return fn(variables, images)
        return wrapped
    monkeypatch.setattr(features, "_batch_embed_fn", counting)

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


# the --out folder


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
