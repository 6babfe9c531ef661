"""The README main job, `adaface-jax quickstart`, end to end at a small size that still learns (the real run
is ~7 min): training must help on held-out identities, and the table must be what the checkpoint gives."""
import json
import os

import numpy as np
import pytest

from adaface_jax.cli import main
from tests.support.cli_fixtures import fail
from tests.support.train_fixtures import flip_fused_accuracy

# 40 identities x 6 images, ir_18 at width 8, batch 32, 5 epochs = 35 steps; 100 held-out pairs of 20
# unseen identities.  Measured (data seeds 0 / 1 / 2): 10-fold accuracy 0.49 -> 0.77 / 0.67 -> 0.85 /
# 0.64 -> 0.87; loss (mean of the first vs last 3 steps) 33.2 -> 10.8 / 33.3 -> 9.1 / final 13.0.
SMALL = ["--identities", "40", "--images-per-identity", "6", "--val-identities", "20", "--val-pairs", "100",
         "--seed", "0", "--config.model.width=8", "--config.global_batch_size=32", "--config.epochs=5",
         "--config.lr_milestones=4,", "--config.model.dropout_rate=0.0", "--config.data.augment=false",
         "--config.evals.verification.every_epochs=0", "--config.log_every=1", "--config.progress=false"]


@pytest.mark.slow
def test_quickstart_learns_and_reports_what_its_checkpoint_gives(tmp_path, capsys):
    work = tmp_path / "qs"
    assert main(["quickstart", "--workdir", str(work), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "10-fold accuracy" in out and "untrained" in out and "trained" in out

    results = json.loads((work / "results.json").read_text())
    assert results["train"]["steps"] == 35  # 240 images // batch 32 = 7 steps, 5 epochs
    for key in ("roc", "norm_vs_quality", "training_samples", "metrics"):
        assert os.path.getsize(results["files"][key]) > 0, key
    assert max(int(d) for d in os.listdir(work / "run" / "checkpoints")) == 35
    assert any(f.startswith("events.out") for f in os.listdir(work / "run" / "tensorboard"))

    # Training helps: the loss falls and held-out verification accuracy rises by a clear margin.
    losses = [json.loads(line)["train/loss"] for line in open(work / "run" / "metrics.jsonl") if "train/loss" in line]
    assert len(losses) == 35 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    before, after = results["untrained"]["accuracy"], results["trained"]["accuracy"]
    assert after >= before + 0.1, (before, after)

    # The table's "trained" accuracy is what the saved checkpoint gives when loaded back and evaluated as the
    # original does (flip test, pre_norm_vector_add), computed here with module.apply and numpy. This test also
    # stands for the loop's "training helps" check.
    from adaface_jax.inference import load_pretrained  # noqa: PLC0415
    from data_pipeline.bin_reader import load_bin  # noqa: PLC0415

    val_bin = str(work / "data" / "synthetic_val.bin")
    assert len(load_bin(val_bin)[1]) == 100
    model = load_pretrained(str(work / "run"))
    # Two float32 programs (jitted here, op by op there) may round a pair's distance across a threshold step on
    # another CPU: at most one of the 100 pairs, 0.01 of the 10-fold mean. An untrained or stale checkpoint
    # is off by far more.
    assert abs(flip_fused_accuracy(model.module, model.variables, val_bin) - after) <= 0.01 + 1e-9


# --- files: every path through adaface_jax.io, local or gs:// ------------------------------------------------
# The refusals, the two parts that touch files (the data step, the results writer) against a bucket, and the whole
# command into a bucket with the tiny backbone (in this process ~15-25 s of CPU: 18 s of wall time on an idle
# 2-core machine, about a minute on a busy one; a child process would add ~10 s of imports).

@pytest.mark.parametrize("workdir,needle", [
    ("s4://bucket/qs", "--workdir s4://bucket/qs: unsupported URL scheme 's4:'"),
    ("gs:/bucket/qs", "--workdir gs:/bucket/qs: not a valid URL"),
    ("gs://", "no bucket"),
])
def test_workdirs_the_file_layer_does_not_serve_are_refused(tmp_path, monkeypatch, capsys, workdir, needle):
    monkeypatch.chdir(tmp_path)
    fail(capsys, ["quickstart", "--workdir", workdir], needle)
    assert os.listdir(tmp_path) == []  # no folder named after a URL scheme


def test_other_files_of_an_output_name_and_too_few_pairs_are_refused(tmp_path, capsys):
    work = tmp_path / "qs"
    work.mkdir()
    (work / "roc.png").write_text("my drawing, not a PNG")
    fail(capsys, ["quickstart", "--workdir", str(work), *SMALL],
             "roc.png: exists and is not an earlier .png output")
    assert (work / "roc.png").read_text() == "my drawing, not a PNG" and os.listdir(work) == ["roc.png"]
    fail(capsys, ["quickstart", "--workdir", str(tmp_path / "new"), "--val-pairs", "19"], "--val-pairs 19")
    assert not (tmp_path / "new").exists()


def test_data_and_results_in_a_bucket_with_the_marker_last(gcs_bucket, tmp_path, monkeypatch, capsys):
    from adaface_jax import io  # noqa: PLC0415
    from adaface_jax.quickstart import format_table, render_data, score_pairs, write_results  # noqa: PLC0415
    from adaface_jax.run_dir import RunDir  # noqa: PLC0415
    from data_pipeline.bin_reader import load_bin  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    work = f"{gcs_bucket}/qs"
    val_bin, val_quality = render_data(f"{work}/data", 2, 2, 2, 20, seed=0)
    assert (val_bin, val_quality) == (f"{work}/data/synthetic_val.bin", f"{work}/data/synthetic_val.quality.npy")
    assert {"manifest.json", "synthetic_val.bin", "synthetic_val.quality.npy"} <= set(io.listdir(f"{work}/data"))
    capsys.readouterr()
    assert render_data(f"{work}/data", 2, 2, 2, 20, seed=0) == (val_bin, val_quality)
    assert "rendering" not in capsys.readouterr().out  # there already: not made again
    images, issame = load_bin(val_bin)
    quality = np.load(io.readable(val_quality))
    assert images.shape[0] == quality.shape[0] == 40 and len(issame) == 20

    rng = np.random.default_rng(0)

    def scores():
        feats = rng.normal(size=(40, 8)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        return score_pairs(feats, rng.uniform(1, 30, (40, 1)).astype(np.float32), issame, quality)

    uploads = []
    upload = io._upload
    monkeypatch.setattr(io, "_upload", lambda local, path: (uploads.append(path), upload(local, path))[1])
    run = RunDir.of(f"{work}/run")
    summary = {"step": 3, "metrics": {"loss": 2.5, "batch_mean": 20.0, "batch_std": 5.0}}
    results = write_results(work, run, scores(), scores(), quality, summary, seconds=1.25)
    assert uploads == [f"{work}/roc.png", f"{work}/norm_vs_quality.png", f"{work}/results.json"]  # the marker last
    assert json.loads(io.read_text(f"{work}/results.json")) == json.loads(json.dumps(results))
    assert results["files"] == {"checkpoints": f"{work}/run/checkpoints", "tensorboard": f"{work}/run/tensorboard",
                                "metrics": f"{work}/run/metrics.jsonl", "roc": f"{work}/roc.png",
                                "norm_vs_quality": f"{work}/norm_vs_quality.png",
                                "training_samples": f"{work}/run/training_samples.png"}
    for name in ("roc.png", "norm_vs_quality.png"):
        assert io.read_bytes(f"{work}/{name}")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "10-fold accuracy" in format_table(results, len(issame))
    assert os.listdir(tmp_path) == []  # nothing written locally, no folder named 'gs:'


# The smallest quickstart that runs every step: the tiny backbone, 4 x 4 identities, 20 pairs, 2 steps.
TINY = ["--identities", "4", "--images-per-identity", "4", "--val-identities", "2", "--val-pairs", "20",
        "--config.model.arch=tiny", "--config.global_batch_size=8", "--config.epochs=1", "--config.lr_milestones=1,",
        "--config.evals.verification.every_epochs=0", "--config.log_every=1", "--config.progress=false"]


def test_the_whole_quickstart_into_a_bucket(gcs_bucket, tmp_path, monkeypatch, capsys):
    """Data, training (orbax checkpoints, TensorBoard, metrics), plots and results.json all in gs://."""
    from adaface_jax import io  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    work = f"{gcs_bucket}/qs"
    assert main(["quickstart", "--workdir", work, *TINY]) == 0
    assert f"checkpoints={work}/run/checkpoints" in capsys.readouterr().out
    results = json.loads(io.read_text(f"{work}/results.json"))
    assert results["train"]["steps"] == 2  # 16 images // batch 8, one epoch
    for key in ("roc", "norm_vs_quality", "training_samples", "metrics"):
        assert results["files"][key].startswith(f"{work}/") and io.getsize(results["files"][key]) > 0, key
    assert max(int(d) for d in io.listdir(f"{work}/run/checkpoints") if d.isdigit()) == 2
    assert any(n.startswith("events.out") for n in io.listdir(f"{work}/run/tensorboard"))
    assert {"manifest.json", "synthetic_val.bin"} <= set(io.listdir(f"{work}/data"))
    assert os.listdir(tmp_path) == []  # nothing written locally, no folder named 'gs:'
