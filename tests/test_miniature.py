"""The paper in miniature: quality-binned verification against brute force and sklearn, the Yale B reader on
hand-made and real folders, the study's batches, AdaFace's scaler against the head, and the command."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_curve as sk_roc_curve

from adaface_jax.errors import InputError
from adaface_jax.miniature import data as study_data
from data_pipeline import synthetic, yale_b
from evaluation import ProtocolError
from evaluation.quality import make_quality_pairs, norm_quality_spearman, verification_by_quality
from cli_fixtures import fail
from test_eval_verification import loop_reference_roc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YALE_B = os.path.join(ROOT, "..", "shared", "data", "yale_b_cropped")


# --- evaluation.quality ---------------------------------------------------------------------------------

def _toy_set(num_ids=6, per_id=10, dim=8, seed=0):
    r = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_ids), per_id)
    quality = r.uniform(0, 1, labels.size)
    centres = r.normal(size=(num_ids, dim))
    # worse quality -> noisier features, so the bins differ
    feats = centres[labels] + r.normal(size=(labels.size, dim)) * (1.5 - quality)[:, None]
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return labels, quality, feats.astype(np.float32)


def test_pairs_are_every_unordered_pair_binned_by_the_worse_image():
    labels, quality, _ = _toy_set()
    p = make_quality_pairs(labels, quality, num_bins=3, pairs_per_bin=40, seed=1)
    n = labels.size
    assert p.first.size == n * (n - 1) // 2 and np.all(p.first < p.second)
    brute = {(i, j): min(quality[i], quality[j]) for i in range(n) for j in range(i + 1, n)}
    assert all(np.isclose(brute[(i, j)], q) for i, j, q in zip(p.first, p.second, p.pair_quality))
    np.testing.assert_array_equal(p.same, labels[p.first] == labels[p.second])
    counts = np.bincount(p.bin)
    assert counts.max() - counts.min() <= 1  # equal-count bins
    for b in range(2):  # every pair of a lower bin is no better than any pair of a higher bin
        assert p.pair_quality[p.bin == b].max() <= p.pair_quality[p.bin == b + 1].min()
    for b, chosen in enumerate(p.sample):
        assert np.all(p.bin[chosen] == b) and p.same[chosen].sum() == 20 and len(set(chosen)) == 40
    # the sample depends only on labels, quality and seed
    q = make_quality_pairs(labels, quality, num_bins=3, pairs_per_bin=40, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(p.sample, q.sample))
    r = make_quality_pairs(labels, quality, num_bins=3, pairs_per_bin=40, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(p.sample, r.sample))


def test_tied_discrete_qualities_still_give_equal_bins():
    labels = np.repeat(np.arange(4), 8)
    quality = np.tile([0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0], 4)  # a few discrete levels, like light positions
    p = make_quality_pairs(labels, quality, num_bins=4, pairs_per_bin=20)
    counts = np.bincount(p.bin)
    assert counts.max() - counts.min() <= 1


def test_binned_metrics_match_brute_force_and_sklearn():
    labels, quality, feats = _toy_set()
    p = make_quality_pairs(labels, quality, num_bins=2, pairs_per_bin=60, seed=3)
    out = verification_by_quality(feats, p, far_targets=(1e-2, 1e-1))
    assert [o["bin"] for o in out] == [0, 1]
    for b, o in enumerate(out):
        chosen = p.sample[b]
        _, _, acc, _ = loop_reference_roc(np.arange(0, 4, 0.01), feats[p.first[chosen]], feats[p.second[chosen]],
                                          p.same[chosen])
        assert o["accuracy"] == pytest.approx(acc.mean(), abs=1e-12)
        in_bin = p.bin == b
        scores = np.sum(feats[p.first[in_bin]] * feats[p.second[in_bin]], axis=1)
        fpr, tpr, _ = sk_roc_curve(p.same[in_bin], scores)
        for far, tar in o["tar"].items():  # nearest-FPR TAR, the last index among ties (reversed argmin)
            k = len(fpr) - 1 - np.argmin(np.abs(fpr[::-1] - far))
            assert tar == pytest.approx(tpr[k])
        assert o["genuine"] == p.same[in_bin].sum() and o["genuine"] + o["impostor"] == in_bin.sum()
    assert out[0]["accuracy"] < out[1]["accuracy"]  # the noisier low-quality bin is harder


def test_quality_pair_errors_name_the_problem():
    labels, quality, feats = _toy_set(num_ids=3, per_id=4)
    with pytest.raises(ProtocolError, match="fewer than"):
        make_quality_pairs(labels, quality, num_bins=4, pairs_per_bin=40)
    with pytest.raises(ProtocolError, match="quality values"):
        make_quality_pairs(labels, quality[:-1])
    with pytest.raises(ProtocolError, match="NaN"):
        make_quality_pairs(labels, np.where(np.arange(labels.size) == 3, np.nan, quality))
    p = make_quality_pairs(labels, quality, num_bins=1, pairs_per_bin=20)
    with pytest.raises(ProtocolError, match="do not cover"):
        verification_by_quality(feats[:5], p)
    bad = feats.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ProtocolError, match="NaN"):
        verification_by_quality(bad, p)


def test_spearman_is_pearson_of_ranks():
    r = np.random.default_rng(0)
    x, y = r.normal(size=50), r.normal(size=50)
    y[:10] = y[10:20]  # ties
    rx, ry = rankdata(x), rankdata(y)
    assert norm_quality_spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)


# --- Yale B -------------------------------------------------------------------------------------------

def test_yale_b_names_and_quality():
    assert yale_b.parse_name("yaleB01_P00A+035E-20.jpg") == ("yaleB01", 35, -20)
    assert yale_b.parse_name("yaleB39_P00A-130E+20.pgm") == ("yaleB39", -130, 20)
    assert yale_b.parse_name("yaleB01_P00_Ambient.pgm") is None
    assert yale_b.parse_name("notes.txt") is None
    q = yale_b.light_quality(np.array([0, 90, 0, 60, 130]), np.array([0, 0, 90, 60, 0]))
    np.testing.assert_allclose(q, [1.0, 0.0, 0.0, 0.25, np.cos(np.radians(130))], atol=1e-12)
    np.testing.assert_allclose(yale_b.light_angle_deg(q), [0, 90, 90, np.degrees(np.arccos(0.25)), 130], atol=1e-9)


def _write_yale(root, subjects=("yaleB01", "yaleB02"), lights=((0, 0), (50, -40), (-110, 65))):
    for s_i, subject in enumerate(subjects):
        os.makedirs(root / subject)
        for a, e in lights:
            img = np.full((192, 168), 40 + 60 * s_i, np.uint8)
            img[:, :84] += 30  # left half brighter: the crop and resize are checked below
            cv2.imwrite(str(root / subject / f"{subject}_P00A{a:+04d}E{e:+03d}.jpg"), img)
        (root / subject / f"{subject}_P00_Ambient.jpg").write_bytes(b"skipped: no light direction")


def test_yale_b_reader_on_a_hand_made_folder(tmp_path):
    _write_yale(tmp_path)
    faces = yale_b.load_yale_b(str(tmp_path), size=28)
    assert faces.images.shape == (6, 28, 28, 3) and faces.subjects == ("yaleB01", "yaleB02")
    np.testing.assert_array_equal(faces.labels, [0, 0, 0, 1, 1, 1])
    by_name = dict(zip(faces.files, faces.quality))
    assert by_name[os.path.join("yaleB01", "yaleB01_P00A+000E+00.jpg")] == pytest.approx(1.0)
    assert by_name[os.path.join("yaleB02", "yaleB02_P00A+050E-40.jpg")] == pytest.approx(
        np.cos(np.radians(50)) * np.cos(np.radians(40)), abs=1e-6)
    assert np.all(faces.images[..., 0] == faces.images[..., 2])  # grey in three equal channels
    assert faces.images[0, 14, 3, 0] > faces.images[0, 14, 24, 0]  # left half brighter after the square crop


@pytest.mark.parametrize("case", ["missing", "one_subject", "undecodable", "wrong_folder"])
def test_yale_b_reader_errors_name_the_file(tmp_path, case):
    root = tmp_path / "yale"
    if case == "missing":
        match = "not a folder"
    elif case == "one_subject":
        _write_yale(root, subjects=("yaleB01",))
        match = "at least 2 subjects"
    elif case == "undecodable":
        _write_yale(root)
        (root / "yaleB02" / "yaleB02_P00A+000E+00.jpg").write_bytes(b"<html>not a jpeg</html>")
        match = "yaleB02_P00A\\+000E\\+00.jpg: not a decodable image"
    else:
        _write_yale(root)
        cv2.imwrite(str(root / "yaleB01" / "yaleB02_P00A+000E+00.jpg"), np.zeros((192, 168), np.uint8))
        match = "file of subject yaleB02 in folder yaleB01"
    with pytest.raises(InputError, match=match):
        yale_b.load_yale_b(str(root), size=16)


def test_real_yale_b(shared_data):
    faces = yale_b.load_yale_b(os.path.join(shared_data, "yale_b_cropped"), size=32)
    assert len(faces.subjects) == 38 and faces.images.shape == (2414, 32, 32, 3)
    frontal = [f.endswith("_P00A+000E+00.jpg") for f in faces.files]
    assert sum(frontal) == 38 and np.all(faces.quality[frontal] == 1.0)
    # frontal light is brighter than light from behind the face plane (the quality axis is real)
    dark = faces.quality < -0.3
    assert faces.images[frontal].mean() > 2 * faces.images[dark].mean()


# --- the study's data and batches ---------------------------------------------------------------------

def test_render_arrays_matches_render_and_spreads_severity():
    images, labels, quality = synthetic.render_arrays([3, 1_000_005], 5, seed=0, severity="spread")
    np.testing.assert_array_equal(labels, [0] * 5 + [1] * 5)
    np.testing.assert_allclose(quality, np.tile([1.0, 0.75, 0.5, 0.25, 0.0], 2), atol=1e-6)
    img, q = synthetic.render(0, 1_000_005, 2, 0.5)
    np.testing.assert_array_equal(images[7], img)
    small, _, q2 = synthetic.render_arrays([3], 4, seed=0, size=56)
    assert small.shape == (4, 56, 56, 3)
    np.testing.assert_allclose(q2, [synthetic.render(0, 3, j)[1] for j in range(4)])


def test_synthetic_study_data_holds_out_identities_and_spreads_test_quality():
    import ml_collections

    study = ml_collections.ConfigDict(dict(synthetic_train_identities=3, synthetic_images_per_identity=5,
                                           synthetic_test_identities=2, synthetic_test_images_per_identity=5,
                                           synthetic_train_severity="spread"))
    d = study_data.synthetic_data(study, 24)
    assert d.train_images.shape == (15, 24, 24, 3) and d.num_classes == 3 and d.test_images.shape[0] == 10
    np.testing.assert_allclose(d.train_quality, np.tile([1, 0.75, 0.5, 0.25, 0], 3), atol=1e-6)
    np.testing.assert_allclose(d.test_quality, np.tile([1, 0.75, 0.5, 0.25, 0], 2), atol=1e-6)
    held_out = synthetic.render(0, synthetic.HELD_OUT_OFFSET + 1, 0, 0.0)[0]  # test identity 1, image 0
    np.testing.assert_array_equal(d.test_images[5], cv2.resize(held_out, (24, 24), interpolation=cv2.INTER_AREA))
    study.synthetic_train_severity = "drawn"
    drawn = study_data.synthetic_data(study, 24).train_quality
    np.testing.assert_allclose(drawn, [synthetic.render(0, i, j)[1] for i in range(3) for j in range(5)])


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    n, b = 50, 8  # 6 batches per epoch, the last 2 rows of each permutation dropped
    epoch0 = np.concatenate([study_data.batch_rows(1, s, n, b) for s in range(6)])
    assert len(set(epoch0)) == 48 and epoch0.max() < n
    again = np.concatenate([study_data.batch_rows(1, s, n, b) for s in range(6)])
    np.testing.assert_array_equal(epoch0, again)
    other_seed = np.concatenate([study_data.batch_rows(2, s, n, b) for s in range(6)])
    assert not np.array_equal(epoch0, other_seed)
    epoch1 = np.concatenate([study_data.batch_rows(1, s, n, b) for s in range(6, 12)])
    assert not np.array_equal(epoch0, epoch1)
    with pytest.raises(InputError, match="cannot fill one batch"):
        study_data.batch_rows(0, 0, 5, 8)


def test_make_batch_flips_and_normalizes_bgr():
    images = np.random.default_rng(0).integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    d = study_data.StudyData("t", images, np.arange(20, dtype=np.int32) % 4, np.linspace(0, 1, 20), images[:4],
                             np.arange(4), np.linspace(0, 1, 4), "q")
    batch = study_data.make_batch(d, seed=3, step=2, batch_size=8, flip_prob=0.5)
    for k, row in enumerate(batch["rows"]):
        expected = images[row][:, ::-1] if batch["flips"][k] else images[row]
        np.testing.assert_allclose(batch["image"][k], (expected / 255.0 - 0.5) / 0.5, atol=1e-6)
        assert batch["label"][k] == row % 4
    assert 0 < batch["flips"].sum() < 8


def test_probe_rows_span_the_quality_range():
    quality = np.random.default_rng(0).uniform(size=100)
    rows = study_data.probe_rows(quality, 11)
    assert rows.size == 11 and quality[rows].min() == quality.min() and quality[rows].max() == quality.max()


# --- AdaFace's scaler as the head applies it ----------------------------------------------------------

def test_scaler_is_the_margin_the_adaface_head_applies():
    import jax.numpy as jnp

    from adaface_jax import heads

    r = np.random.default_rng(0)
    emb = r.normal(size=(6, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    kernel = r.normal(size=(4, 3)).astype(np.float32)
    norms = np.array([[5.0], [18.0], [21.0], [22.5], [30.0], [60.0]], np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2])
    state = heads.AdaFaceState(batch_mean=jnp.full((1,), 22.0), batch_std=jnp.full((1,), 4.0))
    m, h, s = 0.4, 0.333, 64.0
    logits, _ = heads.adaface_logits(jnp.asarray(emb), jnp.asarray(norms), jnp.asarray(labels), jnp.asarray(kernel),
                                     state, m=m, h=h, s=s, t_alpha=0.0)
    scaler = np.clip(h * (norms[:, 0] - 22.0) / (4.0 + 1e-3), -1.0, 1.0)  # paper Eq. 6, by hand
    np.testing.assert_allclose(np.asarray(heads.margin_scaler(norms[:, 0], 22.0, 4.0, h)), scaler, rtol=1e-6)
    assert scaler.min() == -1.0 and scaler.max() == 1.0  # both clips reached
    w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cos = np.clip(emb @ w, -1 + 1e-3, 1 - 1e-3)[np.arange(6), labels]
    theta = np.clip(np.arccos(cos) - m * scaler, 1e-3, np.pi - 1e-3)
    expected = s * (np.cos(theta) - m - m * scaler)  # paper Eq. 7 with the original's clips
    np.testing.assert_allclose(np.asarray(logits)[np.arange(6), labels], expected, rtol=2e-5, atol=2e-4)


# --- the command ------------------------------------------------------------------------------------------

def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "adaface_jax.cli", "miniature", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "XLA_FLAGS": ""})


@pytest.mark.parametrize("args,match", [
    (["--config", "configs/paper_miniature.py:huge"], "setting 'huge': expected 'full' or 'small'"),
    (["--yale-b", "/nonexistent/yale"], "--yale-b /nonexistent/yale: not a folder"),
    (["--config", "configs/quickstart_cpu.py"], "has no 'study' section"),
    (["--config.study.datasets=imagenet"], "unknown dataset 'imagenet'"),
    (["--config.study.steps=0"], "config.study.steps=0: expected a positive integer"),
    (["--config.study.probe_every=0"], "config.study.probe_every=0: expected a positive integer"),
    (["--config.study.heads=adaface,sphereface"], "config.study.heads="),
    (["--config.study.seeds=1,1"], "config.study.seeds=(1, 1): expected distinct"),
    (["--config.study.pairs_per_bin=7"], "pairs_per_bin=7: expected an even number"),
    (["--config.study.steps=ten"], "--config.study.steps='ten': expected int"),
    (["--config.study.synthetic_train_severity=heavy"], "expected 'drawn' or 'spread'"),
    (["--config.cpu_convolutions=onednn"], "config.cpu_convolutions='onednn': expected one of ('eigen', 'xla_default')"),
])
def test_bad_input_is_one_line(tmp_path, args, match):
    res = _cli("--out", str(tmp_path / "out"), *args, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "training images" not in res.stdout, res.stdout  # refused before any data is made or loaded
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaface-jax miniature: error:") and match in lines[0], res.stderr


@pytest.mark.slow
def test_command_runs_records_and_resumes(tmp_path):
    out = tmp_path / "mini"
    args = ["--out", str(out), "--config", "configs/paper_miniature.py:small", "--config.study.datasets=synthetic",
            "--config.study.heads=adaface,cosface", "--config.study.seeds=0", "--config.study.steps=4"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "| synthetic | adaface |" in first.stdout and "| synthetic | cosface |" in first.stdout
    study = json.loads((out / "study.json").read_text())
    runs = {r["head"]: r for r in study["runs"]}
    assert set(runs) == {"adaface", "cosface"} and runs["adaface"]["batch_digest"] == runs["cosface"]["batch_digest"]
    assert len(runs["adaface"]["history"]["loss"]) == 4 and "batch_std" not in runs["cosface"]["history"]
    assert runs["adaface"]["untrained_spearman"] == runs["cosface"]["untrained_spearman"]  # same initial weights
    for name in ("overview.png", "accuracy_by_quality.png", "adaface_training.png", "table.md", "summary.json"):
        assert (out / name).stat().st_size > 0
    again = _cli(*args)
    assert again.returncode == 0 and again.stdout.count("recorded earlier, skipped") == 2, again.stdout
    record = out / "runs" / "synthetic-cosface-seed0.json"
    record.write_text(record.read_text()[:100])  # a damaged record is trained again, not trusted
    damaged = _cli(*args)
    assert damaged.returncode == 0 and "is unreadable (JSONDecodeError), training it again" in damaged.stdout
    assert damaged.stdout.count("recorded earlier, skipped") == 1 and json.loads(record.read_text())["head"] == "cosface"
    more_seeds = _cli(*[a if a != "--config.study.seeds=0" else "--config.study.seeds=0,1" for a in args])
    assert more_seeds.returncode == 0, more_seeds.stderr[-2000:]  # a report over read and new records
    assert more_seeds.stdout.count("recorded earlier, skipped") == 2 and "2 runs trained" in more_seeds.stdout
    assert len(json.loads((out / "study.json").read_text())["runs"]) == 4
    changed = _cli(*args[:-1], "--config.study.steps=3")  # other settings: not the recorded runs
    assert changed.returncode == 0 and "skipped" not in changed.stdout


# --- files: every path through adaface_jax.io, local or gs:// ------------------------------------------------
# The smallest study that runs every part: the tiny backbone, 4 + 4 synthetic identities, AdaFace, one seed, 2
# steps (about 12 s of CPU in this process; the command in a child process costs ~25 s, so the bucket run below
# calls run_study and write_report in-process).
TINY_STUDY = {"study.datasets": "synthetic", "study.heads": "adaface", "study.seeds": "0", "study.steps": "2",
              "model.arch": "tiny", "study.synthetic_train_identities": "4", "study.synthetic_test_identities": "4"}


@pytest.mark.parametrize("args,needle", [
    (["--out", "s4://bucket/mini"], "--out s4://bucket/mini: unsupported URL scheme 's4:'"),
    (["--out", "gs:/bucket/mini"], "--out gs:/bucket/mini: not a valid URL"),
    (["--out", "gs://"], "no bucket"),
    (["--yale-b", "s4://bucket/yale"], "--yale-b s4://bucket/yale: unsupported URL scheme 's4:'"),
    (["--yale-b", "gs:/bucket/yale"], "--yale-b gs:/bucket/yale: not a valid URL"),
])
def test_paths_the_file_layer_does_not_serve_are_refused(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)  # the default --out is runs/miniature, relative to here
    fail(capsys, ["miniature", *args], needle)
    assert os.listdir(tmp_path) == []  # no folder named after a URL scheme, no runs/


def test_an_out_that_is_a_file_or_holds_another_file_of_a_report_name_is_refused(tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8 a photo")
    fail(capsys, ["miniature", "--out", str(photo)], "exists and is not a directory")
    assert photo.read_bytes() == b"\xff\xd8 a photo"
    out = tmp_path / "notes"
    out.mkdir()
    (out / "study.json").write_text("my notes, not JSON")
    fail(capsys, ["miniature", "--out", str(out), *[f"--config.{k}={v}" for k, v in TINY_STUDY.items()]],
             "study.json: exists and is not an earlier .json output")
    assert (out / "study.json").read_text() == "my notes, not JSON" and os.listdir(out) == ["study.json"]


def test_study_and_report_in_a_bucket_marker_last_and_resumed(gcs_bucket, tmp_path, monkeypatch):
    """run_study and write_report into gs://: each file uploaded once, whole, to its final name; the record before
    study.json, summary.json last; a second run reads the record back from the bucket and appends to the log."""
    from adaface_jax import io
    from adaface_jax.miniature import run_study
    from adaface_jax.miniature.report import write_report
    from adaface_jax.train.config_io import apply_overrides, load_config

    monkeypatch.chdir(tmp_path)
    uploads = []
    upload = io._upload
    monkeypatch.setattr(io, "_upload", lambda local, path: (uploads.append(path), upload(local, path))[1])
    out = f"{gcs_bucket}/mini"
    config = apply_overrides(load_config(os.path.join(ROOT, "configs", "paper_miniature.py:small")), TINY_STUDY)
    result = run_study(config, out, quiet=True)
    paths = write_report(result, out)

    names = [u[len(out) + 1:] for u in uploads]
    record = "runs/synthetic-adaface-seed0.json"
    reported = ["table.md", "overview.png", "accuracy_by_quality.png", "adaface_training.png",
                "norm_vs_quality_synthetic.png"]
    assert [n for n in names if n != "study.log"] == [record, "study.json", *reported, "summary.json"]
    assert sorted(io.listdir(out)) == sorted(["runs", "study.json", "study.log", "summary.json", *reported])
    assert paths["summary"] == f"{out}/summary.json" and paths["overview"] == f"{out}/overview.png"
    assert all(io.read_bytes(f"{out}/{n}")[:8] == b"\x89PNG\r\n\x1a\n" for n in reported if n.endswith(".png"))
    study = json.loads(io.read_text(f"{out}/study.json"))
    assert [r["head"] for r in study["runs"]] == ["adaface"] and study["resumed_runs"] == 0
    assert json.loads(io.read_text(f"{out}/summary.json"))["synthetic"]["heads"]["adaface"]["seeds"] == [0]
    assert "| synthetic | adaface |" in io.read_text(f"{out}/table.md")
    log = io.read_text(f"{out}/study.log")
    assert "held-out Spearman" in log and "study finished" in log

    uploads.clear()
    again = run_study(config, out, quiet=True)
    assert again["resumed_runs"] == 1 and again["runs"] == result["runs"]
    assert record not in [u[len(out) + 1:] for u in uploads]  # read back, not trained and written again
    log_again = io.read_text(f"{out}/study.log")
    assert log_again.startswith(log) and "recorded earlier, skipped" in log_again[len(log):]
    assert os.listdir(tmp_path) == []  # nothing written locally, no folder named 'gs:'
