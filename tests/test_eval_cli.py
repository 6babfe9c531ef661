"""`adaface-jax evaluate`: features files for every protocol, and the checkpoint path via a tiny model."""
import csv
import json
import types

import cv2
import numpy as np
import pytest

from evaluation import ijb, ijbs, tinyface, verification
from tests.eval_fixtures import FEATS, IMAGES, make_tree, small_meta, write_protocol


def run_cli(argv):
    from adaface_jax.cli import main
    return main(["evaluate"] + argv)


def _hq_sets(seed):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(40, 8)).astype(np.float32)
    issame = np.tile([True, False], 10)
    f[1::2][issame] = f[0::2][issame] + 0.4 * f[1::2][issame]
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32), issame


def test_hq_features_file(tmp_path, capsys):
    (fa, ia), (fb, ib) = _hq_sets(0), _hq_sets(1)
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


def test_missing_array_in_features_file(tmp_path, capsys):
    np.savez(tmp_path / "f.npz", names=np.array(["lfw"]), features_lfw=np.zeros((4, 2), np.float32))
    assert run_cli(["--protocol", "hq", "--features", str(tmp_path / "f.npz"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adaface-jax evaluate: error: ")
    assert "f.npz: missing array 'issame_lfw'" in err[0]
    assert not (tmp_path / "o").exists()
