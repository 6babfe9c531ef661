"""The README main job, `adaface-jax quickstart`, end to end at toy size (the real run is ~7 min)."""
import json
import os

import numpy as np

from adaface_jax.cli import main


def test_quickstart_writes_checkpoint_logs_plots_and_a_consistent_table(tmp_path, capsys):
    work = tmp_path / "qs"
    rc = main(["quickstart", "--workdir", str(work), "--identities", "4", "--images-per-identity", "4",
               "--val-identities", "4", "--val-pairs", "20", "--config.global_batch_size=8",
               "--config.epochs=1", "--config.eval.every_epochs=0", "--config.log_every=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "10-fold accuracy" in out and "untrained" in out and "trained" in out

    results = json.loads((work / "results.json").read_text())
    assert results["train"]["steps"] == 2  # 16 images / batch 8, one epoch
    for key in ("roc", "norm_vs_quality", "training_samples", "metrics"):
        assert os.path.getsize(results["files"][key]) > 0, key
    assert os.listdir(work / "run" / "checkpoints") == ["2"]
    assert any(f.startswith("events.out") for f in os.listdir(work / "run" / "tensorboard"))

    # The table's "trained" accuracy is what the saved checkpoint gives when loaded back.
    from adaface_jax.inference import load_pretrained
    from data_pipeline.bin_reader import load_bin
    from evaluation.verification import evaluate

    images, issame = load_bin(str(work / "data" / "synthetic_val.bin"))
    model = load_pretrained(str(work / "run"))
    feats, _ = model.embed(images, flip_test=True)
    assert np.mean(evaluate(feats, issame)[2]) == results["trained"]["accuracy"]
    assert 0.0 <= results["untrained"]["accuracy"] <= 1.0
