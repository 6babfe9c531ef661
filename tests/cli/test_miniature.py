"""`adaface-jax miniature`: one-line refusals, a run that records and resumes, a study in a bucket."""
import json
import os

import pytest

from adaface_jax.cli import main
from tests.support import REPO
from tests.support.cli_fixtures import fail

ROOT = str(REPO)


# --- the command ------------------------------------------------------------------------------------------------

# The smallest study that runs every part: the tiny backbone, a few identities, 2 steps.
TINY_STUDY = {"study.arms": "adaface", "study.seeds.adaface": "0", "study.steps": "2", "model.arch": "tiny",
              "study.train_identities": "4", "study.test_identities": "4"}


@pytest.mark.parametrize("args,needle", [
    (["--config", "configs/paper_miniature.py:huge"], "setting 'huge': expected 'full' or 'small'"),
    (["--config", "configs/quickstart_cpu.py"], "has no 'study' section"),
    (["--config.study.arms=adaface,sphereface"], "config.study.arms="),
    (["--config.study.seeds.cosface=1,1"], "config.study.seeds.cosface=(1, 1): expected distinct"),
    (["--config.study.primary=rank5 adaface - cosface"], "config.study.primary='rank5 adaface - cosface'"),
    (["--config.study.steps=0"], "config.study.steps=0: expected a positive integer"),
    (["--config.study.steps=ten"], "--config.study.steps='ten': expected int"),
    (["--config.study.train_degraded.side=6,80"], "config.study.train_degraded="),
    (["--config.study.adaface_norm_stats=zeros"], "expected 'constants' or 'first_batch'"),
    (["--config.study.datasets=yale_b"], "--config.study.datasets: unknown config field"),
    (["--config.cpu_convolutions=onednn"], "config.cpu_convolutions='onednn'"),
    (["--out", "s4://bucket/mini"], "--out s4://bucket/mini: unsupported URL scheme 's4:'"),
    (["--out", "gs:/bucket/mini"], "--out gs:/bucket/mini: not a valid URL"),
])
def test_bad_input_is_one_line_before_anything_is_made(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(ROOT)
    out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
    fail(capsys, ["miniature", *out, *args], needle)
    assert not (tmp_path / "out").exists()  # refused before the data is made or a folder written


def test_an_out_that_is_a_file_or_holds_another_file_of_a_report_name_is_refused(tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8 a photo")
    fail(capsys, ["miniature", "--out", str(photo)], "exists and is not a directory")
    assert photo.read_bytes() == b"\xff\xd8 a photo"
    out = tmp_path / "notes"
    out.mkdir()
    (out / "study.json").write_text("my notes, not JSON")
    fail(capsys, ["miniature", "--out", str(out), "--config", os.path.join(ROOT, "configs", "paper_miniature.py:small"),
                  *[f"--config.{k}={v}" for k, v in TINY_STUDY.items()]],
         "study.json: exists and is not an earlier .json output")
    assert (out / "study.json").read_text() == "my notes, not JSON" and os.listdir(out) == ["study.json"]


@pytest.mark.slow
def test_command_runs_records_and_resumes(tmp_path, monkeypatch, capsys):
    """The command five times in this process (a subprocess per call would spend ~10 s a call importing)."""
    monkeypatch.chdir(ROOT)

    def cli(*args):
        code = main(["miniature", *args])
        return code, capsys.readouterr().out

    out = tmp_path / "mini"
    args = ["--out", str(out), "--config", "configs/paper_miniature.py:small",
            "--config.study.arms=adaface,cosface,oracle",
            "--config.study.seeds.adaface=0", "--config.study.seeds.cosface=0", "--config.study.seeds.oracle=0",
            "--config.study.steps=4"]
    code, stdout = cli(*args)
    assert code == 0
    assert stdout.startswith("**Mechanism gate:") or "\n**Mechanism gate:" in stdout
    study = json.loads((out / "study.json").read_text())
    runs = {r["arm"]: r for r in study["runs"]}
    assert set(runs) == {"adaface", "cosface", "oracle"}
    assert len({r["batch_digest"] for r in runs.values()}) == 1 and len({r["init_digest"] for r in runs.values()}) == 1
    assert len(runs["adaface"]["history"]["loss"]) == 4 and "batch_std" not in runs["cosface"]["history"]
    assert "scaler" in runs["oracle"]["probes"][0] and "scaler" not in runs["cosface"]["probes"][0]
    for name in ("overview.png", "training.png", "table.md", "findings.md", "summary.json"):
        assert (out / name).stat().st_size > 0
    code, stdout = cli(*args)
    assert code == 0 and stdout.count("recorded earlier, skipped") == 3, stdout
    record = out / "runs" / "cosface-seed0.json"
    record.write_text(record.read_text()[:100])  # a damaged record is trained again, not trusted
    code, stdout = cli(*args)
    assert code == 0 and "is unreadable (JSONDecodeError), training it again" in stdout
    code, stdout = cli(*[a if a != "--config.study.seeds.cosface=0" else "--config.study.seeds.cosface=0,1"
                         for a in args])
    assert code == 0 and stdout.count("recorded earlier, skipped") == 3
    assert "1 runs trained" in stdout
    code, stdout = cli(*args[:-1], "--config.study.steps=3")  # other settings: not the recorded runs
    assert code == 0 and "skipped" not in stdout


def test_study_and_report_in_a_bucket_marker_last_and_resumed(gcs_bucket, tmp_path, monkeypatch):
    """run_study and write_report into gs://: each file uploaded once, whole, to its final name; the record before
    study.json, summary.json last; a second run reads the record back from the bucket and appends to the log."""
    from adaface_jax import io
    from adaface_jax.miniature import run_study
    from adaface_jax.miniature.report import write_report
    from adaface_jax.train.config import apply_overrides, load_config

    monkeypatch.chdir(tmp_path)
    uploads = []
    upload = io._upload
    monkeypatch.setattr(io, "_upload", lambda local, path: (uploads.append(path), upload(local, path))[1])
    out = f"{gcs_bucket}/mini"
    config = apply_overrides(load_config(os.path.join(ROOT, "configs", "paper_miniature.py:small")), TINY_STUDY)
    result = run_study(config, out, quiet=True)
    paths = write_report(result, out)

    names = [u[len(out) + 1:] for u in uploads]
    record = "runs/adaface-seed0.json"
    reported = ["findings.md", "table.md", "overview.png", "training.png"]
    assert [n for n in names if n != "study.log"] == [record, "study.json", *reported, "summary.json"]
    assert sorted(io.listdir(out)) == sorted(["runs", "study.json", "study.log", "summary.json", *reported])
    assert paths["summary"] == f"{out}/summary.json" and paths["overview"] == f"{out}/overview.png"
    assert all(io.read_bytes(f"{out}/{n}")[:8] == b"\x89PNG\r\n\x1a\n" for n in reported if n.endswith(".png"))
    study = json.loads(io.read_text(f"{out}/study.json"))
    assert [r["arm"] for r in study["runs"]] == ["adaface"] and study["resumed_runs"] == 0
    summary = json.loads(io.read_text(f"{out}/summary.json"))
    assert summary["arms"]["adaface"]["seeds"] == [0] and summary["text"].startswith("**Mechanism gate:")
    assert "| adaface | 1 |" in io.read_text(f"{out}/table.md")
    log = io.read_text(f"{out}/study.log")
    assert "rank-1 degraded" in log and "study finished" in log

    uploads.clear()
    again = run_study(config, out, quiet=True)
    assert again["resumed_runs"] == 1 and again["runs"] == result["runs"]
    assert record not in [u[len(out) + 1:] for u in uploads]  # read back, not trained and written again
    log_again = io.read_text(f"{out}/study.log")
    assert log_again.startswith(log) and "recorded earlier, skipped" in log_again[len(log):]
    assert os.listdir(tmp_path) == []  # nothing written locally, no folder named 'gs:'
