"""The data commands on gs://, end to end against a real Cloud Storage API server on loopback (tests/support/gcs_server.py):
`prepare folder` into a bucket killed mid-shard, refused by `check` while unfinished, resumed, then checked;
`synthesize` into a bucket; the training input reading a gs:// dataset gives the same batches as its local copy;
`check` refuses a gs:// folder without a manifest; `prepare rec|folder|bin` read their sources from a bucket.

The killed `prepare` and the refusing `check` run as `adaface-jax` subprocesses with the server's environment (a
fresh process: its whole stderr is the one line); the other commands and the in-process calls (the input pipeline,
reading results) reach the same server through the environment the gcs_server fixture sets."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adaface_jax import io
from data_pipeline import prepare, recordio
from data_pipeline.manifest import read_manifest
from tests.support.data_fixtures import jpeg, read_tfrecord_examples
from adaface_jax.cli import main
from tests.support.cli_fixtures import CLI, fail, ok
from tests.support.datasets import KILLED_CHILD, identities
from tests.support import REPO as REPO_ROOT

REPO = str(REPO_ROOT)


def cli(gcs_server, tmp_path, *argv, code=None, child=None):
    """`adaface-jax ARGV` in a child process with the server's environment (a killed child's temporary files
    land in tmp_path). Returns the CompletedProcess."""
    tmp = tmp_path / "child_tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, **gcs_server.env, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp)}
    cmd = CLI if child is None else [sys.executable, "-c", child]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=300, env=env)


def one_error_line(proc, command, *needles):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"adaface-jax {command}: error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def succeeded_here(capsys, argv) -> dict:
    """`adaface-jax ARGV` in this process: exit 0, nothing on stderr; its JSON summary line."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0 and not err.strip(), err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_prepare_into_a_bucket_killed_refused_resumed_and_checked(gcs_server, gcs_bucket, tmp_path, capsys):
    src = identities(tmp_path / "src", classes=4, per_class=3)
    out = f"{gcs_bucket}/datasets/faces"
    argv = ["prepare", "folder", src, out, "--workers", "0", "--num-shards", "4"]
    killed = cli(gcs_server, tmp_path, "2", *argv, child=KILLED_CHILD)  # SIGKILL inside the third shard
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not io.exists(f"{out}/manifest.json")
    assert len(io.glob(out, "faces-train.tfrecord-*")) == 2
    # (the rest in this process: each child pays ~10 s of interpreter and TensorFlow start-up)
    fail(capsys, ["check", out], f"{out}/manifest.json not found", f"unfinished conversion of folder {src}",
         "2 shard(s) finished")
    resumed = succeeded_here(capsys, argv)
    assert resumed["resumed_shards"] == 2 and resumed["num_images"] == 12 and resumed["out"] == out
    assert "OK, 12 records in 4 shard(s)" in ok(capsys, ["check", out, "--no-progress"])
    manifest = read_manifest(out)
    assert manifest["source"]["path"] == src and not io.exists(f"{out}/.progress/source.json")


def test_synthesize_into_a_bucket(gcs_bucket, capsys):
    out = f"{gcs_bucket}/syn"
    result = succeeded_here(capsys, ["synthesize", out, "--identities", "3", "--images-per-identity", "2",
                                     "--val-identities", "2", "--val-pairs", "4"])
    assert result["out"] == out and result["num_images"] == 6
    assert result["verification"]["bin"] == f"{out}/synthetic_val.bin"
    from data_pipeline.bin_reader import load_bin
    images, issame = load_bin(f"{out}/synthetic_val.bin")
    assert images.shape == (8, 112, 112, 3) and len(issame) == 4
    assert np.load(io.readable(f"{out}/synthetic_val.quality.npy")).shape == (8,)
    manifest = read_manifest(out)
    assert manifest["verification"]["bin"] == "synthetic_val.bin" and manifest["num_classes"] == 3
    assert len(read_tfrecord_examples([f"{out}/{s['file']}" for s in manifest["shards"]])) == 6


def test_training_input_reads_a_bucket_as_it_reads_a_local_copy(gcs_bucket, tmp_path):
    from data_pipeline.input import TrainInputConfig, make_train_iterator
    src = identities(tmp_path / "src", classes=4, per_class=4)
    local = str(tmp_path / "ds")
    prepare.convert_folder(src, local, num_workers=0, num_shards=3, show_progress=False)
    remote = f"{gcs_bucket}/ds"
    names = sorted(n for n in os.listdir(local) if os.path.isfile(os.path.join(local, n)))
    for name in sorted(names, key=lambda n: n == "manifest.json"):  # the manifest last, as prepare does
        io.copy(os.path.join(local, name), f"{remote}/{name}")
    runs = {}
    for data_dir in (local, remote):
        cfg = TrainInputConfig(data_dir=data_dir, global_batch_size=4, seed=1, image_size=16, shuffle_buffer=8,
                               num_streams=2, crop_prob=0.5, photometric_prob=0.5)
        it = make_train_iterator(cfg)
        runs[data_dir] = [next(it) for _ in range(5)]  # past the end of the first epoch (4 steps)
    for a, b in zip(runs[local], runs[remote]):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_check_refuses_a_bucket_folder_without_a_manifest(gcs_server, gcs_bucket, tmp_path, capsys):
    io.write_text(f"{gcs_bucket}/notes/readme.txt", "not a dataset")
    proc = cli(gcs_server, tmp_path, "check", f"{gcs_bucket}/notes")
    one_error_line(proc, "check", f"{gcs_bucket}/notes/manifest.json not found", "is not a dataset written by")
    fail(capsys, ["check", f"{gcs_bucket}/nothing"], f"{gcs_bucket}/nothing does not exist")


def test_prepare_reads_rec_folder_and_bin_sources_from_a_bucket(gcs_bucket, tmp_path, capsys):
    # rec: an InsightFace dataset folder in the bucket
    items = [(jpeg(i, 16), i % 3) for i in range(9)]
    recordio.write_insightface_rec(str(tmp_path / "train.rec"), str(tmp_path / "train.idx"), items)
    for name in ("train.rec", "train.idx"):
        io.copy(str(tmp_path / name), f"{gcs_bucket}/faces_emore/{name}")
    io.write_text(f"{gcs_bucket}/faces_emore/property", "3,112,112")
    out = str(tmp_path / "from_rec")
    assert ok(capsys, ["prepare", "rec", f"{gcs_bucket}/faces_emore", out, "--workers", "0"])["num_images"] == 9
    assert read_tfrecord_examples([f"{out}/{s['file']}" for s in read_manifest(out)["shards"]]) == \
        {k + 1: items[k] for k in range(9)}
    # folder: the layout rules hold for a bucket too (one listing per folder)
    local = identities(tmp_path / "imgs", classes=3, per_class=2)
    for c in range(3):
        for i in range(2):
            io.copy(os.path.join(local, f"id{c}", f"{i}.jpg"), f"{gcs_bucket}/casia/CASIA-WebFace/id{c}/{i}.jpg")
    io.write_bytes(f"{gcs_bucket}/casia/CASIA-WebFace/id1/IMG.HEIC", b"heic")
    fail(capsys, ["prepare", "folder", f"{gcs_bucket}/casia", str(tmp_path / "o")],
         f"pass {gcs_bucket}/casia/CASIA-WebFace as the image folder")
    result = ok(capsys, ["prepare", "folder", f"{gcs_bucket}/casia/CASIA-WebFace", str(tmp_path / "o"),
                         "--workers", "0"])
    assert result["num_images"] == 6 and result["skipped_files"] == [f"{gcs_bucket}/casia/CASIA-WebFace/id1/IMG.HEIC"]
    # bin: a .bin in the bucket, decoded into a cache in the bucket, then read back from the cache
    from data_pipeline.bin_reader import write_bin
    write_bin(f"{gcs_bucket}/val/lfw.bin", [jpeg(i, 112) for i in range(4)], [True, False])
    for _ in range(2):
        result = ok(capsys, ["prepare", "bin", f"{gcs_bucket}/val/lfw.bin", f"{gcs_bucket}/cache"])
        assert result["images"] == [4, 112, 112, 3] and result["cache_dir"] == f"{gcs_bucket}/cache"
    assert len(io.glob(f"{gcs_bucket}/cache", "lfw.*.npy")) == 2


@pytest.mark.parametrize("command", [["prepare", "folder", "SRC", "gs:/BUCKET/ds"], ["synthesize", "gs:/BUCKET/syn"],
                                     ["check", "gs:/BUCKET/ds"]])
def test_a_one_slash_url_is_refused_and_makes_no_folder(gcs_bucket, tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    src = identities(tmp_path / "src", classes=2)
    argv = [a.replace("SRC", src).replace("BUCKET", gcs_bucket[len("gs://"):]) for a in command]
    fail(capsys, argv, "not a valid URL", "two slashes")
    assert sorted(os.listdir(tmp_path)) == ["src"] and not io.listdir(gcs_bucket)
