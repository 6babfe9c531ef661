"""Deployment: ONNX / SavedModel export against the JAX model and the PyTorch reference, and the
calibrated same-person thresholds (evaluation.calibration) against brute force."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from adaface_jax.cli import main
from adaface_jax.inference import load_pretrained
from evaluation import calibration
from tests.support.torch_reference import build_backbone, randomize_, save_released

onnx = pytest.importorskip("onnx", reason="the [export] extra (onnx, onnxruntime) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the [export] extra (onnx, onnxruntime) is not installed")

FLOAT32_TOL = 1e-5


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-style ir_18 .ckpt (random weights of the PyTorch reference) and its conversion."""
    tmp = tmp_path_factory.mktemp("deploy")
    backbone = randomize_(build_backbone("ir_18"), seed=5).eval()
    ckpt = tmp / "adaface_ir18_random.ckpt"
    save_released(backbone.state_dict(), ckpt)
    converted = tmp / "converted"
    assert main(["convert", str(ckpt), str(converted)]) == 0
    return dict(tmp=tmp, ckpt=ckpt, converted=converted, backbone=backbone, model=load_pretrained(str(converted)))


def _inputs(n=4, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, 112, 112, 3)).astype(np.float32)


def _ort(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_matches_jax_with_dynamic_batch_and_named_outputs(released, tmp_path):
    out = tmp_path / "ir18.onnx"
    assert main(["export", str(released["converted"]), str(out), "--format", "onnx"]) == 0
    sess = _ort(out)
    assert [o.name for o in sess.get_outputs()] == ["embedding", "norm"]
    assert sess.get_inputs()[0].shape == ["batch", 112, 112, 3]
    model = onnx.load(str(out))
    assert {op.domain: op.version for op in model.opset_import}[""] == 17
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["layout"] == "NHWC" and meta["channel_order"] == "BGR" and "(x/255 - 0.5) / 0.5" in meta["normalization"]
    for n in (1, 5):  # any batch size
        x = _inputs(n, seed=n)
        emb, norm = sess.run(None, {"input": x})
        want_emb, want_norm = released["model"].embed(x)
        assert np.max(np.abs(emb - want_emb)) <= FLOAT32_TOL
        assert np.max(np.abs(norm / want_norm - 1)) <= FLOAT32_TOL


def test_onnx_nchw_rgb_no_norm_and_float16(released, tmp_path):
    x = _inputs(3, seed=7)
    want_emb, want_norm = released["model"].embed(x)
    out = tmp_path / "nchw_rgb.onnx"
    assert main(["export", str(released["converted"]), str(out), "--format", "onnx", "--layout", "NCHW",
                 "--channel-order", "RGB", "--no-norm"]) == 0
    sess = _ort(out)
    assert [o.name for o in sess.get_outputs()] == ["embedding"]
    (emb,) = sess.run(None, {"input": np.ascontiguousarray(x[..., ::-1].transpose(0, 3, 1, 2))})
    assert np.max(np.abs(emb - want_emb)) <= FLOAT32_TOL
    half = tmp_path / "half.onnx"
    assert main(["export", str(released["converted"]), str(half), "--format", "onnx", "--dtype", "float16"]) == 0
    emb16, norm16 = _ort(half).run(None, {"input": x})
    # measured on ir_18/ir_se_50 with random weights: 1.5e-4 on embeddings, 1.3e-4 relative on norms
    assert np.max(np.abs(emb16 - want_emb)) < 1e-3 and np.max(np.abs(norm16 / want_norm - 1)) < 1e-3
    assert os.path.getsize(half) < 0.6 * os.path.getsize(tmp_path / "nchw_rgb.onnx")


def test_savedmodel_serving_signature_matches_jax(released, tmp_path):
    import tensorflow as tf

    out = tmp_path / "saved"
    assert main(["export", str(released["converted"]), str(out), "--format", "savedmodel"]) == 0
    loaded = tf.saved_model.load(str(out))
    serve = loaded.signatures["serving_default"]
    x = _inputs(3, seed=3)
    got = serve(input=tf.constant(x))
    want_emb, want_norm = released["model"].embed(x)
    assert np.max(np.abs(got["embedding"].numpy() - want_emb)) <= FLOAT32_TOL
    assert np.max(np.abs(got["norm"].numpy() / want_norm - 1)) <= FLOAT32_TOL
    contract = json.loads((out / "assets.extra" / "adaface_meta.json").read_text())
    assert contract["layout"] == "NHWC" and contract["channel_order"] == "BGR"
    # plain TF ops: TFLite converts it, and its interpreter gives the same numbers
    lite = tf.lite.TFLiteConverter.from_saved_model(str(out)).convert()
    interpreter = tf.lite.Interpreter(model_content=lite)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    lite_out = sorted((interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()),
                      key=lambda a: -a.shape[1])  # embedding (D columns), then norm (1 column)
    assert np.max(np.abs(lite_out[0] - want_emb)) <= FLOAT32_TOL
    assert np.max(np.abs(lite_out[1] / want_norm - 1)) <= FLOAT32_TOL


def test_ckpt_to_onnx_reproduces_the_models_on_the_reference_photos(released, shared_data, tmp_path):
    """The whole chain on real photos: a released .ckpt -> ONNX -> onnxruntime, against the converted
    JAX model and the independent PyTorch reference on the same aligned crops."""
    from adaface_jax.align import align_face

    crops = [align_face(str(shared_data / "adaface_test_images" / f"img{i}.jpeg")).face_bgr for i in (1, 2, 3)]
    assert all(c is not None for c in crops)
    x = ((np.stack(crops).astype(np.float64) / 255.0 - 0.5) / 0.5).astype(np.float32)
    out = tmp_path / "from_ckpt.onnx"
    assert main(["export", str(released["ckpt"]), str(out), "--format", "onnx"]) == 0
    emb, norm = _ort(out).run(None, {"input": x})
    jax_emb, jax_norm = released["model"].embed(x)
    assert np.max(np.abs(emb - jax_emb)) <= FLOAT32_TOL
    with torch.no_grad():
        t_emb, t_norm = released["backbone"](torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    assert np.max(np.abs(emb - t_emb.numpy())) <= FLOAT32_TOL
    assert np.max(np.abs(norm / t_norm.numpy() - 1)) <= FLOAT32_TOL
    # the SavedModel on the same photos
    import tensorflow as tf

    saved = tmp_path / "from_ckpt_saved"
    assert main(["export", str(released["ckpt"]), str(saved), "--format", "savedmodel"]) == 0
    got = tf.saved_model.load(str(saved)).signatures["serving_default"](input=tf.constant(x))
    assert np.max(np.abs(got["embedding"].numpy() - jax_emb)) <= FLOAT32_TOL
    assert np.max(np.abs(got["norm"].numpy() / jax_norm - 1)) <= FLOAT32_TOL


def _one_line(capsys, command, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"adaface-jax {command}: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_export_refuses_meaningless_options_and_names_the_missing_extra(released, tmp_path, capsys, monkeypatch):
    src = str(released["converted"])
    assert main(["export", src, str(tmp_path / "a.onnx"), "--format", "onnx", "--no-head"]) == 1
    _one_line(capsys, "export", "--no-head")
    assert main(["export", src, str(tmp_path / "s"), "--format", "savedmodel", "--dtype", "float16"]) == 1
    _one_line(capsys, "export", "--dtype float16")
    assert main(["export", src, str(tmp_path / "a.ckpt"), "--layout", "NCHW"]) == 1
    _one_line(capsys, "export", "--layout")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["export", src, str(busy), "--format", "savedmodel"]) == 1
    _one_line(capsys, "export", "not empty")
    assert (busy / "keep.txt").read_text() == "mine"
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the extra were not installed
    assert main(["export", src, str(tmp_path / "b.onnx"), "--format", "onnx"]) == 1
    _one_line(capsys, "export", "pip install 'adaface-jax[export]'")
    assert not (tmp_path / "b.onnx").exists()


# ------------------------------------------------------------------------------------- calibration

def _pairs_with_cosines(cosines, dim=8, seed=0):
    """Interleaved unit vectors whose pair i has exactly cosine ``cosines[i]``."""
    rs = np.random.RandomState(seed)
    out = []
    for c in cosines:
        q, _ = np.linalg.qr(rs.randn(dim, 2))
        a, b = q[:, 0], q[:, 1]
        out += [a, c * a + math.sqrt(1 - c * c) * b]
    return np.asarray(out)


def test_calibration_on_a_synthetic_set_with_known_rates():
    # 10,000 impostor cosines evenly spread on (-0.5, 0.5) and 1,000 genuine ones on (0.2, 0.9):
    # the FAR=1e-2 threshold is the 101st largest impostor score, and the rates follow exactly.
    rs = np.random.RandomState(1)
    impostor = rs.permutation(np.linspace(-0.5, 0.5, 10_000))
    genuine = rs.permutation(np.linspace(0.2, 0.9, 1_000))
    scores = np.concatenate([genuine, impostor])
    issame = np.r_[np.ones(1000, bool), np.zeros(10_000, bool)]
    order = rs.permutation(scores.size)
    scores, issame = scores[order], issame[order]
    feats = _pairs_with_cosines(scores[:600], seed=2)  # the geometry: pair_cosines recovers the scores
    np.testing.assert_allclose(calibration.pair_cosines(feats), scores[:600], atol=1e-12)

    cal = calibration.calibrate(scores, issame, fars=(1e-2, 1e-3, 1e-4, 1e-5))
    imp_desc = np.sort(impostor)[::-1]
    for far, k in ((1e-2, 100), (1e-3, 10), (1e-4, 1)):
        e = cal["thresholds"][f"{far:g}"]
        assert e["threshold"] == imp_desc[k]
        assert e["far"] == k / 10_000 and e["tar"] == np.mean(genuine > imp_desc[k])
        # brute force of the held-out estimate: threshold from 9 folds, rates on the tenth
        tars, fars = [], []
        for f in range(10):
            test = np.zeros(scores.size, bool)
            test[f * 1100:(f + 1) * 1100] = True
            train_imp = np.sort(scores[~test & ~issame])[::-1]
            t = train_imp[int(math.floor(far * train_imp.size + 1e-9))]
            tars.append(np.mean(scores[test & issame] > t))
            fars.append(np.mean(scores[test & ~issame] > t))
        assert e["held_out_tar_mean"] == pytest.approx(np.mean(tars), abs=1e-12)
        assert e["held_out_far_mean"] == pytest.approx(np.mean(fars), abs=1e-12)
    assert cal["thresholds"]["0.01"]["reliable"] and not cal["thresholds"]["0.0001"]["reliable"]
    assert "1e-05" in cal["unsupported"] and "100000 impostor pairs" in cal["unsupported"]["1e-05"]
    assert calibration.decide(0.45, cal) == {k: 0.45 > v["threshold"] for k, v in cal["thresholds"].items()}


def test_calibrate_command_on_real_lfw_pairs_then_compare_and_export_carry_it(released, shared_data, tmp_path,
                                                                              capsys):
    """Real LFW pairs (the first 100 same and 100 different pairs of lfw_gray112.bin's first fold),
    embedded by the random model: enough to check the plumbing against brute force on the same features."""
    from data_pipeline.bin_reader import load_bin, write_bin, safe_unpickle_bin

    bins, issame = safe_unpickle_bin(str(shared_data / "lfw_gray112.bin"))
    keep = np.r_[np.arange(100), np.arange(300, 400)]  # fold 1: 300 same then 300 different pairs
    subset = tmp_path / "lfw_subset.bin"
    write_bin(str(subset), [bins[j] for i in keep for j in (2 * i, 2 * i + 1)], issame[keep])
    model_dir = tmp_path / "model"
    import shutil
    shutil.copytree(released["converted"], model_dir)
    rc = main(["calibrate", "--checkpoint", str(model_dir), "--bin", str(subset), "--far", "1e-2", "1e-3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "not calibrated" in out  # 1e-3 needs 1000 impostor pairs; the subset has 100
    meta = json.loads((model_dir / "adaface_meta.json").read_text())
    cal = meta["calibration"]
    images, same = load_bin(str(subset))
    feats, _ = load_pretrained(str(model_dir)).embed(images)
    cos = np.sum(feats[0::2].astype(np.float64) * feats[1::2], axis=1)
    assert cal["thresholds"]["0.01"]["threshold"] == pytest.approx(np.sort(cos[~same])[::-1][1], abs=1e-6)
    assert set(cal["unsupported"]) == {"0.001"} and cal["num_impostor"] == 100

    # compare prints the decision beside each cosine
    crop = tmp_path / "a.png"
    import cv2
    cv2.imwrite(str(crop), images[0])
    cv2.imwrite(str(tmp_path / "b.png"), images[1])
    assert main(["compare", str(crop), str(tmp_path / "b.png"), "--checkpoint", str(model_dir), "--no-align"]) == 0
    printed = capsys.readouterr().out
    expected = "yes" if cos[0] > cal["thresholds"]["0.01"]["threshold"] else "no"
    assert f"same person at FAR=0.01: {expected}" in printed
    # and an export carries the thresholds in its metadata
    onnx_path = tmp_path / "cal.onnx"
    assert main(["export", str(model_dir), str(onnx_path), "--format", "onnx"]) == 0
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["calibration"])["thresholds"]["0.01"]["threshold"] == cal["thresholds"]["0.01"]["threshold"]


def test_calibrate_bad_inputs_are_one_line(released, tmp_path, capsys):
    assert main(["calibrate", "--checkpoint", str(released["converted"]), "--bin", str(tmp_path / "none.bin")]) == 1
    _one_line(capsys, "calibrate", "none.bin")
    np.savez(tmp_path / "f.npz", features=np.zeros((6, 4), np.float32))
    assert main(["calibrate", "--checkpoint", str(released["converted"]), "--features", str(tmp_path / "f.npz")]) == 1
    _one_line(capsys, "calibrate", "f.npz", "'issame'")
    feats = _pairs_with_cosines(np.linspace(0.1, 0.9, 20))
    np.savez(tmp_path / "g.npz", features=feats, issame=np.ones(20, bool))
    assert main(["calibrate", "--checkpoint", str(released["converted"]), "--features", str(tmp_path / "g.npz")]) == 1
    _one_line(capsys, "calibrate", "0 impostor pairs")
    assert main(["calibrate", "--checkpoint", str(released["converted"]), "--features", str(tmp_path / "g.npz"),
                 "--far", "2"]) == 1
    _one_line(capsys, "calibrate", "--far 2")


# ------------------------------------------------------------------------------ the export format


def test_export_takes_the_format_from_the_suffix(released, tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["export", str(released["converted"]), str(out)]) == 0  # no --format: ONNX, not a torch zip
    assert out.read_bytes()[:4] != b"PK\x03\x04"
    emb, _ = _ort(out).run(None, {"input": _inputs(2)})
    assert np.max(np.abs(emb - released["model"].embed(_inputs(2))[0])) <= FLOAT32_TOL
    pt = tmp_path / "m.pt"
    assert main(["export", str(released["converted"]), str(pt)]) == 0
    assert "state_dict" in torch.load(pt, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("out, fmt, needles", [
    ("a.ckpt", "onnx", ("--format onnx contradicts", "a.ckpt", "torch")),
    ("a.onnx", "torch", ("--format torch contradicts", "a.onnx", "onnx")),
    ("a.onnx", "savedmodel", ("--format savedmodel contradicts", "a.onnx")),
    ("a.bin", None, ("a.bin", "cannot tell the format", "--format")),
    ("model", None, ("model", "cannot tell the format")),
    ("face.jpeg", "onnx", ("face.jpeg", "expected a file name ending in .onnx")),
    ("face.jpeg", "torch", ("face.jpeg", "expected a file name ending in .ckpt or .pt or .pth")),
])
def test_export_refuses_a_format_it_cannot_tell_or_a_contradiction(released, tmp_path, capsys, out, fmt, needles):
    target = tmp_path / out
    if out == "face.jpeg":
        target.write_bytes(b"\xff\xd8\xff a photo")
    argv = ["export", str(released["converted"]), str(target)] + (["--format", fmt] if fmt else [])
    assert main(argv) == 1
    _one_line(capsys, "export", *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["face.jpeg"] if out == "face.jpeg" else [])
    if out == "face.jpeg":
        assert target.read_bytes() == b"\xff\xd8\xff a photo"


def test_export_replaces_only_an_earlier_output_never_its_source(released, tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(released["ckpt"].read_bytes())
    assert main(["export", str(ckpt), str(ckpt)]) == 1
    _one_line(capsys, "export", "is the model being exported")
    assert ckpt.read_bytes() == released["ckpt"].read_bytes()
    earlier = tmp_path / "earlier.onnx"
    earlier.write_bytes(b"an earlier export")
    assert main(["export", str(released["converted"]), str(earlier)]) == 0
    assert onnx.load(str(earlier)).graph.node


# ----------------------------------------------------------------------- stored calibration structure

GOOD_CAL = {"rule": calibration.RULE, "source": "x.bin", "flip_test": False,
            "thresholds": {"0.01": {"threshold": 0.3, "far_target": 0.01}}, "unsupported": {}}


@pytest.mark.parametrize("cal, needles", [
    ([1, 2], ("expected a JSON object", "got a list")),
    ({"rule": "x"}, ("missing key 'thresholds'",)),
    ({"thresholds": [0.3]}, ("key 'thresholds' must be a non-empty object", "got a list")),
    ({"thresholds": {}}, ("key 'thresholds' must be a non-empty object", "empty object")),
    ({"thresholds": {"0.01": 0.3}}, ("key 'thresholds.0.01' must be an object",)),
    ({"thresholds": {"0.01": {"far": 0.01}}}, ("missing key 'thresholds.0.01.threshold'",)),
    ({"thresholds": {"0.01": {"threshold": "high"}}}, ("key 'thresholds.0.01.threshold' must be a finite number",)),
    ({"thresholds": {"0.01": {"threshold": True}}}, ("'thresholds.0.01.threshold' must be a finite number",)),
    ({"thresholds": {"0.01": {"threshold": float("nan")}}}, ("'thresholds.0.01.threshold' must be a finite",)),
    ({"thresholds": {"high": {"threshold": 0.3}}}, ("key 'thresholds.high'", "false accept rate")),
    ({**GOOD_CAL, "flip_test": "yes"}, ("key 'flip_test' must be true, false or null",)),
])
def test_a_calibration_of_the_wrong_structure_names_the_file_and_the_key(cal, needles):
    with pytest.raises(calibration.ProtocolError) as info:
        calibration.check_calibration(cal, "/m/x.ckpt.calibration.json")
    assert str(info.value).startswith("/m/x.ckpt.calibration.json: ")
    for needle in needles:
        assert needle in str(info.value)
    assert calibration.check_calibration(GOOD_CAL, "w") is GOOD_CAL


def test_compare_and_export_refuse_a_damaged_thresholds_file_in_one_line(released, tmp_path, capsys):
    import shutil

    import cv2

    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(released["ckpt"].read_bytes())
    sidecar = tmp_path / "m.ckpt.calibration.json"
    sidecar.write_text(json.dumps({"thresholds": {"0.01": {"threshold": "0.3"}}}))
    crop = tmp_path / "a.png"
    cv2.imwrite(str(crop), np.full((112, 112, 3), 100, np.uint8))
    assert main(["compare", str(crop), str(crop), "--checkpoint", str(ckpt), "--no-align"]) == 1
    _one_line(capsys, "compare", str(sidecar), "'thresholds.0.01.threshold' must be a finite number")
    sidecar.write_text("[]")
    assert main(["export", str(ckpt), str(tmp_path / "m.onnx")]) == 1
    _one_line(capsys, "export", str(sidecar), "expected a JSON object")
    assert not (tmp_path / "m.onnx").exists()
    # a converted directory: its meta file's 'calibration' field
    model_dir = tmp_path / "model"
    shutil.copytree(released["converted"], model_dir)
    meta = json.loads((model_dir / "adaface_meta.json").read_text())
    (model_dir / "adaface_meta.json").write_text(json.dumps({**meta, "calibration": {"thresholds": {"0.01": {}}}}))
    assert main(["compare", str(crop), str(crop), "--checkpoint", str(model_dir), "--no-align"]) == 1
    _one_line(capsys, "compare", "adaface_meta.json (its 'calibration' field)", "missing key 'thresholds.0.01.threshold'")


def test_calibrate_replaces_only_an_earlier_thresholds_file(released, tmp_path, capsys):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(released["ckpt"].read_bytes())
    sidecar = tmp_path / "m.ckpt.calibration.json"
    sidecar.write_text("my notes, not JSON")
    feats = _pairs_with_cosines(np.r_[np.linspace(0.5, 0.9, 100), np.linspace(-0.3, 0.3, 200)])
    np.savez(tmp_path / "f.npz", features=feats, issame=np.r_[np.ones(100, bool), np.zeros(200, bool)])
    argv = ["calibrate", "--checkpoint", str(ckpt), "--features", str(tmp_path / "f.npz"), "--far", "1e-2"]
    assert main(argv) == 1
    _one_line(capsys, "calibrate", str(sidecar), "refusing to replace")
    assert sidecar.read_text() == "my notes, not JSON"
    sidecar.write_text(json.dumps([1]))  # an earlier (damaged) JSON file is replaced by a good one
    assert main(argv) == 0
    stored = json.loads(sidecar.read_text())
    assert calibration.check_calibration(stored, str(sidecar))["thresholds"]["0.01"]["threshold"] == pytest.approx(0.3, abs=0.01)
