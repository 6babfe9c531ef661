"""The evaluation, deployment and photo commands on gs://, end to end against a real Cloud Storage API server on
loopback (tests/support/gcs_server.py): `evaluate --checkpoint/--bin/--out/--cache-dir/--save-features` and an IJB-C
protocol folder in a bucket, `embed` photos from and features into a bucket, `export` into a bucket (ONNX by its
suffix, a PyTorch .ckpt, a SavedModel folder), `calibrate` storing into a model in a bucket, `convert` into a bucket,
and the refusal of paths the file layer does not serve (`s4://`, `gs:/one-slash`).

The commands run in this process through `adaface_jax.cli.main`, as `adaface-jax` would run them, each in a
folder of its own; they, and the calls that write inputs and read results, reach the server through the
environment the gcs_server fixture sets. (A child process would add ~10 s of interpreter, JAX and TensorFlow
start-up to each command; what is tested here is where the files go, not the process boundary.) The model is an
ir_18 at width 8 (a converted directory written straight into the bucket), so its few MB upload and compile in
seconds."""
import contextlib
import dataclasses
import json
import os

import cv2
import numpy as np
import pytest

from adaface_jax import io
from adaface_jax.cli import main
from tests.support.eval_fixtures import FEATS, small_meta


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """``cli(cwd, *argv)``: `adaface-jax ARGV` run in ``cwd`` (where nothing may appear: no folder named after a
    URL scheme, no stray output); its exit code and what it printed."""
    def run(cwd, *argv):
        capsys.readouterr()
        with contextlib.chdir(cwd):
            rc = main(list(argv))
        out, err = capsys.readouterr()
        return Result(rc, out, err)
    return run


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stdout


def one_error_line(proc, command, *needles):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"adaface-jax {command}: error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def names_under(folder):
    """Every file below a bucket folder, as '/'-separated relative paths."""
    out = []
    for d, _, files in io.walk(folder):
        rel = d[len(folder):].strip("/")
        out += [f"{rel}/{f}" if rel else f for f in files]
    return sorted(out)


def small_model_variables(seed=0):
    """{'params', 'batch_stats'} of an ir_18 at width 8, random (numpy; shapes from eval_shape, no compile)."""
    import jax
    import jax.numpy as jnp

    from adaface_jax.models import build_model

    model = build_model("ir_18", width=8)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)), train=False))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return np.abs(rng.normal(1.0, 0.1, s.shape)).astype(np.float32)
        if "alpha" in name:
            return np.full(s.shape, 0.25, np.float32)
        return (rng.normal(size=s.shape) * (0.1 if len(s.shape) < 2 else 1.0 / np.sqrt(np.prod(s.shape[:-1])))
                ).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, {"params": shapes["params"], "batch_stats": shapes["batch_stats"]})


@pytest.fixture(scope="module")
def bucket(gcs_server):
    """A bucket for this module, holding ``model/`` (a converted directory written by save_converted straight into
    the bucket) and ``lfw.bin`` (20 random aligned faces, 10 pairs)."""
    from adaface_jax.convert.convert import save_converted
    from data_pipeline.bin_reader import write_bin

    name = gcs_server.make_bucket()
    root = f"gs://{name}"
    save_converted(f"{root}/model", "ir_18", 112, small_model_variables(), None, {"width": 8, "source": "random"})
    faces = np.random.default_rng(1).integers(0, 256, (20, 112, 112, 3), dtype=np.uint8)
    write_bin(f"{root}/lfw.bin", [cv2.imencode(".png", f)[1].tobytes() for f in faces], [True, False] * 5)
    yield root
    gcs_server.delete_bucket(name)


def test_the_model_in_the_bucket_is_a_finished_converted_directory(bucket):
    assert names_under(f"{bucket}/model")[0] == "adaface_meta.json"
    assert json.loads(io.read_text(f"{bucket}/model/adaface_meta.json"))["width"] == 8
    assert any(n.startswith("checkpoint/") for n in names_under(f"{bucket}/model"))


def test_evaluate_with_every_path_in_a_bucket(cli, bucket, tmp_path):
    from evaluation import verification

    run = f"{bucket}/eval1"
    proc = cli(tmp_path, "evaluate", "--protocol", "hq", "--checkpoint", f"{bucket}/model",
               "--bin", f"{bucket}/lfw.bin", "--out", f"{run}/res", "--cache-dir", f"{run}/cache",
               "--save-features", f"{run}/feats.npz", "--batch-size", "8", "--nrof-folds", "2", "--no-flip")
    assert f"results written to {run}/res" in ok(proc)
    assert names_under(f"{run}/res") == ["hq_result.csv", "hq_roc.png", "results.json"]
    res = json.loads(io.read_text(f"{run}/res/results.json"))
    assert res["source"] == f"{bucket}/model" and res["name"] == "model"
    with np.load(io.readable(f"{run}/feats.npz")) as z:
        feats, issame = z["features_lfw"], z["issame_lfw"]
    assert feats.shape == (20, 512) and np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    assert res["results"]["sets"]["lfw"]["accuracy"] == pytest.approx(
        np.mean(verification.evaluate(feats, issame, nrof_folds=2)[2]))
    cached = names_under(f"{run}/cache")
    assert any(n.endswith("__flip0_pre_norm_vector_add.npz") for n in cached)  # the features cache
    assert any(n.endswith(".images.npy") for n in cached)                      # the decoded .bin
    assert not [n for n in names_under(run) if n.endswith(io.TEMP_SUFFIX)]
    assert list(tmp_path.iterdir()) == []  # nothing local: no 'gs:' folder, no results/ folder


def test_evaluate_an_ijbc_protocol_folder_in_a_bucket(cli, bucket, tmp_path):
    local = tmp_path / "local"
    small_meta(local)
    norms = np.linalg.norm(FEATS, axis=1, keepdims=True)
    np.savez(local / "f.npz", features=FEATS / norms, norms=norms, fusion=np.array("pre_norm_vector_add"),
             flip_test=np.array(True))
    data = f"{bucket}/ijb"
    io.publish_dir(str(local / "IJBC"), f"{data}/IJBC")
    io.copy(str(local / "f.npz"), f"{data}/f.npz")
    assert main(["evaluate", "--protocol", "ijbc", "--features", str(local / "f.npz"), "--data", str(local),
                 "--out", str(tmp_path / "want")]) == 0
    want = json.loads((tmp_path / "want" / "results.json").read_text())["results"]
    work = tmp_path / "cwd"
    work.mkdir()
    argv = ["evaluate", "--protocol", "ijbc", "--features", f"{data}/f.npz", "--data", data]
    ok(cli(work, *argv, "--out", f"{data}/res"))
    got = json.loads(io.read_text(f"{data}/res/results.json"))["results"]
    assert got == want and "rank" in got["identification"]
    assert names_under(f"{data}/res") == sorted(p.name for p in (tmp_path / "want").iterdir())
    # one 1:N file gone from the bucket: an error naming it, nothing written
    missing = f"{data}/IJBC/meta/ijbc_1N_gallery_G2.csv"
    io.remove(missing)
    one_error_line(cli(work, *argv, "--out", f"{data}/res2"), "evaluate", missing, "missing")
    assert not io.exists(f"{data}/res2")
    assert list(work.iterdir()) == []


def test_embed_photos_from_a_bucket_into_a_bucket(cli, bucket, tmp_path):
    photos = f"{bucket}/photos"
    face = np.random.default_rng(2).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    png = cv2.imencode(".png", face)[1].tobytes()
    io.write_bytes(f"{photos}/a.png", png)
    io.write_bytes(f"{photos}/a_copy.png", png)
    out = f"{bucket}/embed/feats.npz"
    proc = cli(tmp_path, "embed", f"{photos}/a.png", f"{photos}/a_copy.png", f"{photos}/gone.png",
               "--checkpoint", f"{bucket}/model", "--out", out, "--batch-size", "2")
    assert proc.returncode == 1, proc.stderr[-3000:]  # one photo is missing: reported in the file, not fatal
    assert f"wrote {out}: 2/3 images embedded" in proc.stdout
    with np.load(io.readable(out)) as z:
        assert z["ok"].tolist() == [True, True, False]
        assert list(z["sources"]) == [f"{photos}/a.png", f"{photos}/a_copy.png", f"{photos}/gone.png"]
        assert "no such file" in str(z["errors"][2])
        emb = z["embeddings"]
    np.testing.assert_array_equal(emb[0], emb[1])
    assert np.linalg.norm(emb[0]) == pytest.approx(1, abs=1e-5) and np.isnan(emb[2]).all()
    # --out naming one of the photos: refused, the photo unchanged
    one_error_line(cli(tmp_path, "embed", "--checkpoint", f"{bucket}/model", "--out", f"{photos}/a.png",
                       f"{photos}/a_copy.png"), "embed", f"{photos}/a.png", "expected a file name ending in .npz")
    assert io.read_bytes(f"{photos}/a.png") == png
    assert list(tmp_path.iterdir()) == []


def test_export_into_a_bucket_in_every_format(cli, bucket, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    out = f"{bucket}/exported"
    ok(cli(tmp_path, "export", f"{bucket}/model", f"{out}/m.onnx"))  # the format from the suffix
    model = onnx.load_from_string(io.read_bytes(f"{out}/m.onnx"))
    assert {p.key: p.value for p in model.metadata_props}["arch"] == "ir_18"
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    emb, norm = sess.run(None, {"input": np.random.default_rng(3).uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)})
    assert emb.shape == (2, 512) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    ok(cli(tmp_path, "export", f"{bucket}/model", f"{out}/m.ckpt"))  # torch, by its suffix
    import io as pyio
    sd = torch.load(pyio.BytesIO(io.read_bytes(f"{out}/m.ckpt")), map_location="cpu", weights_only=True)["state_dict"]
    assert tuple(sd["model.input_layer.0.weight"].shape) == (8, 3, 3, 3)
    ok(cli(tmp_path, "export", f"{bucket}/model", f"{out}/saved", "--format", "savedmodel"))
    saved = names_under(f"{out}/saved")
    assert "saved_model.pb" in saved and "assets.extra/adaface_meta.json" in saved
    assert any(n.startswith("variables/") for n in saved)
    assert json.loads(io.read_text(f"{out}/saved/assets.extra/adaface_meta.json"))["arch"] == "ir_18"
    assert list(tmp_path.iterdir()) == []


def test_calibrate_stores_its_thresholds_in_a_model_in_a_bucket(cli, bucket, tmp_path):
    model = f"{bucket}/calibrated"
    files = names_under(f"{bucket}/model")
    for rel in sorted(files, key=lambda n: n == "adaface_meta.json"):  # a copy of the model, its meta file last
        io.copy(f"{bucket}/model/{rel}", f"{model}/{rel}")
    rng = np.random.default_rng(4)
    cos = np.r_[rng.uniform(0.4, 0.9, 100), rng.uniform(-0.3, 0.3, 200)]
    a = rng.normal(size=(300, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = rng.normal(size=(300, 8))
    b -= np.sum(a * b, axis=1, keepdims=True) * a
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    feats = np.stack([a, cos[:, None] * a + np.sqrt(1 - cos[:, None] ** 2) * b], axis=1).reshape(600, 8)
    buf = __import__("io").BytesIO()
    np.savez(buf, features=feats, issame=np.r_[np.ones(100, bool), np.zeros(200, bool)])
    io.write_bytes(f"{bucket}/pairs.npz", buf.getvalue())
    stdout = ok(cli(tmp_path, "calibrate", "--checkpoint", model, "--features", f"{bucket}/pairs.npz",
                    "--far", "1e-2"))
    assert f"stored in {model}/adaface_meta.json" in stdout
    meta = json.loads(io.read_text(f"{model}/adaface_meta.json"))
    assert meta["arch"] == "ir_18" and meta["width"] == 8  # the rest of the meta file kept
    threshold = meta["calibration"]["thresholds"]["0.01"]["threshold"]
    assert threshold == pytest.approx(np.sort(cos[100:])[::-1][2], abs=1e-9)
    assert meta["calibration"]["source"] == "pairs.npz"
    assert list(tmp_path.iterdir()) == []


def test_convert_a_checkpoint_into_a_bucket(cli, gcs_bucket, tmp_path):
    """A released-style .ckpt (ir_18 at 16x16 input: the smallest IResNet a .ckpt can hold, 46 MB) converted
    into a bucket, then read back from it."""
    import hashlib

    import jax
    import torch

    from adaface_jax.weights import load_weights
    from adaface_jax.convert.convert import export_state_dict, flax_shapes, to_torch_state_dict

    rng = np.random.default_rng(5)
    shapes = flax_shapes("ir_18", 16)
    variables = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                       {"params": shapes["params"], "batch_stats": shapes["batch_stats"]})
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": to_torch_state_dict(export_state_dict(variables["params"], variables["batch_stats"]))},
               ckpt)
    work = tmp_path / "cwd"
    work.mkdir()
    out = f"{gcs_bucket}/converted"
    assert f"-> {out}: ir_18 16x16" in ok(cli(work, "convert", str(ckpt), out))
    assert names_under(out)[0] == "adaface_meta.json" and any(n.startswith("checkpoint/") for n in names_under(out))
    meta = json.loads(io.read_text(f"{out}/adaface_meta.json"))
    assert meta["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    loaded = load_weights(out)
    np.testing.assert_array_equal(loaded.variables["params"]["input_layer_0"]["kernel"],
                                  variables["params"]["input_layer_0"]["kernel"])
    assert list(work.iterdir()) == []


def test_a_checkpoint_file_in_a_bucket_is_read_safely(gcs_bucket, tmp_path):
    import torch

    from adaface_jax.convert.safe_load import UnsafeCheckpointError, read_torch_checkpoint

    buf = __import__("io").BytesIO()
    torch.save({"state_dict": {"model.x": torch.arange(3.0)}}, buf)
    io.write_bytes(f"{gcs_bucket}/small.ckpt", buf.getvalue())
    assert read_torch_checkpoint(f"{gcs_bucket}/small.ckpt")["state_dict"]["model.x"].tolist() == [0.0, 1.0, 2.0]

    sentinel = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))
    buf = __import__("io").BytesIO()
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "callbacks": RunsCode()}, buf)
    io.write_bytes(f"{gcs_bucket}/evil.ckpt", buf.getvalue())
    with pytest.raises(UnsafeCheckpointError, match=f"{gcs_bucket}/evil.ckpt: refusing to call"):
        read_torch_checkpoint(f"{gcs_bucket}/evil.ckpt")
    assert not sentinel.exists()


@pytest.mark.parametrize("command, url, needle", [("evaluate", "s4://bucket/x", "unsupported URL scheme 's4:'"),
                                                  ("embed", "gs:/bucket/x.npz", "two slashes")])
def test_paths_the_file_layer_does_not_serve_are_refused(cli, bucket, tmp_path, command, url, needle):
    argv = {"evaluate": ["evaluate", "--protocol", "hq", "--checkpoint", f"{bucket}/model", "--bin", f"{bucket}/lfw.bin",
                         "--out", url],
            "embed": ["embed", f"{bucket}/lfw.bin", "--checkpoint", f"{bucket}/model", "--out", url]}[command]
    one_error_line(cli(tmp_path, *argv), command, f"--out {url}", needle)
    assert list(tmp_path.iterdir()) == []  # no local folder named after a URL scheme
