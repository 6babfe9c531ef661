"""The rules of `prepare`/`synthesize`/`check` about folders and outputs, each with a test that fails when the
rule is broken by one step:

* which image-folder layouts `prepare folder` refuses (a wrapper folder, images directly in the top folder, a
  single identity, an identity folder with no image we read, a folder that cannot be read, a FIFO) and what it
  skips and names (files in other formats, stray top-level images);
* the manifest is the finished marker: written last, and removed first when a finished dataset is about to
  change; `check` and the training input refuse a folder without one, naming an unfinished conversion;
* an interrupted conversion (the process killed mid-shard) resumes, or is refused for another source;
* when an existing output may be replaced (only an earlier output of the same kind).
"""
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import convert
from data_pipeline.manifest import read_manifest
from cli_fixtures import fail, ok
from data_fixtures import jpeg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def images(folder, names, size=16, seed=0):
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(names):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(jpeg(seed + k, size))


def identities(root, classes=3, per_class=2):
    for c in range(classes):
        images(os.path.join(root, f"id{c}"), [f"{i}.jpg" for i in range(per_class)], seed=10 * c)
    return str(root)


def snapshot(root) -> dict:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read() if not stat.S_ISFIFO(os.stat(path).st_mode) \
                else "fifo"
    return out


# ------------------------------------------------------------------------------------ folder layouts

def test_a_wrapper_folder_is_refused_naming_the_folder_to_pass(tmp_path, capsys):
    casia = tmp_path / "casia"
    identities(casia / "CASIA-WebFace", classes=3)
    out = tmp_path / "out"
    fail(capsys, ["prepare", "folder", str(casia), str(out)], str(casia), "only the folder CASIA-WebFace",
         "look like the identities", f"pass {casia / 'CASIA-WebFace'} as the image folder")
    # two wrapper levels (and a README beside them): the folder named is the one holding the identities
    deep = tmp_path / "deep"
    identities(deep / "a" / "b", classes=2)
    (deep / "README.txt").write_text("unpacked from faces.tar\n")
    fail(capsys, ["prepare", "folder", str(deep), str(out)], f"pass {deep / 'a' / 'b'} as the image folder")
    assert not out.exists()
    result = ok(capsys, ["prepare", "folder", str(casia / "CASIA-WebFace"), str(out), "--workers", "0"])
    assert result["num_classes"] == 3 and result["num_images"] == 6


def test_images_directly_in_the_folder_and_a_single_identity_are_refused(tmp_path, capsys):
    flat = tmp_path / "flat"
    images(flat, ["a.jpg", "b.jpg", "c.png"])
    out = tmp_path / "out"
    fail(capsys, ["prepare", "folder", str(flat), str(out)], str(flat), "holds 3 images directly",
         "no identity folders")
    single = tmp_path / "single"
    images(single / "alice", ["0.jpg", "1.jpg"])
    fail(capsys, ["prepare", "folder", str(single), str(out)], "single identity folder (alice, 2 images)",
         "at least 2")
    # one identity holding two folders of images: the hint names the folder that may hold the identities
    images(single / "alice" / "x", ["0.jpg"])
    images(single / "alice" / "y", ["0.jpg"])
    fail(capsys, ["prepare", "folder", str(single), str(out)], f"pass {single / 'alice'}")
    assert not out.exists()


def test_identity_folders_without_an_image_we_read_are_refused(tmp_path, capsys):
    src = tmp_path / "src"
    identities(src, classes=2)
    images(src / "heic_only", ["0.HEIC", "1.heic"])
    (src / "empty").mkdir()
    out = tmp_path / "out"
    line = fail(capsys, ["prepare", "folder", str(src), str(out)], str(src), "2 of 4 identity folders hold no image",
                "heic_only (2 .heic)", "empty (empty)", "empty class")
    assert ".jpg" in line and not out.exists()
    # every identity in a format we do not read: named with what was found
    only_heic = tmp_path / "only_heic"
    for c in range(2):
        images(only_heic / f"p{c}", ["0.heic"])
    fail(capsys, ["prepare", "folder", str(only_heic), str(out)], "no images with extensions",
         "found 2 other files: 2 .heic")


def test_skipped_files_are_counted_and_named_in_the_summary_and_manifest(tmp_path, capsys):
    src = tmp_path / "src"
    identities(src, classes=2, per_class=2)
    (src / "id0" / "notes.txt").write_text("photographer: x\n")
    images(src / "id1", ["IMG_7.HEIC"])
    images(src, ["preview.jpg"])  # next to the identity folders: belongs to no identity
    (src / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored
    out = str(tmp_path / "out")
    result = ok(capsys, ["prepare", "folder", str(src), out, "--workers", "0"])
    expected = [str(src / "preview.jpg"), str(src / "id0" / "notes.txt"), str(src / "id1" / "IMG_7.HEIC")]
    assert result["num_images"] == 4 and result["num_skipped_files"] == 3
    assert result["skipped_files"] == expected
    manifest = read_manifest(out)
    assert manifest["num_skipped_files"] == 3 and [f["path"] for f in manifest["skipped_files"]] == expected
    assert manifest["class_counts"] == [2, 2]


def _deny(monkeypatch, path):
    """os.scandir raises PermissionError for ``path``, as for a folder without read permission (this works as
    root too, which reads every folder)."""
    real = os.scandir

    def scandir(p="."):
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(p)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("where", ["identity", "nested", "top"])
def test_a_folder_that_cannot_be_read_is_an_error(tmp_path, capsys, monkeypatch, where):
    src = tmp_path / "src"
    identities(src, classes=3)
    images(src / "id1" / "more", ["9.jpg"])
    denied = {"identity": src / "id2", "nested": src / "id1" / "more", "top": src}[where]
    _deny(monkeypatch, denied)
    out = tmp_path / "out"
    fail(capsys, ["prepare", "folder", str(src), str(out), "--skip-corrupt"], f"folder {denied} cannot be read",
         "Permission denied")
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder without read permission: see the "
                                              "monkeypatched test_a_folder_that_cannot_be_read_is_an_error")
def test_a_folder_without_read_permission_is_an_error(tmp_path, capsys):
    src = tmp_path / "src"
    identities(src, classes=3)
    os.chmod(src / "id1", 0)
    try:
        fail(capsys, ["prepare", "folder", str(src), str(tmp_path / "out")], f"folder {src / 'id1'} cannot be read")
    finally:
        os.chmod(src / "id1", 0o755)


def test_a_fifo_is_an_unreadable_image_never_a_hang(tmp_path, capsys):
    src = tmp_path / "src"
    identities(src, classes=2)
    os.mkfifo(src / "id1" / "stream.jpg")
    out = str(tmp_path / "out")
    fail(capsys, ["prepare", "folder", str(src), out], str(src / "id1" / "stream.jpg"), "not a regular file",
         "--skip-corrupt")
    result = ok(capsys, ["prepare", "folder", str(src), out, "--skip-corrupt", "--workers", "0"])
    assert result["num_images"] == 4 and result["num_skipped_corrupt"] == 1
    assert read_manifest(out)["skipped_corrupt"][0]["path"] == str(src / "id1" / "stream.jpg")


# ------------------------------------------------------------------------------------ outputs

def test_outputs_that_are_not_earlier_outputs_are_never_replaced(tmp_path, capsys):
    src = identities(tmp_path / "src", classes=2)
    keep = tmp_path / "existing_file.txt"
    keep.write_text("keep me")
    fail(capsys, ["prepare", "folder", src, str(keep)], str(keep), "not a directory")
    fail(capsys, ["synthesize", str(keep), "--identities", "2", "--images-per-identity", "1"], str(keep))
    fail(capsys, ["prepare", "bin", str(tmp_path / "x.bin"), str(keep)], str(keep), "not a directory")
    assert keep.read_text() == "keep me"
    # a folder holding files a conversion would write, but no dataset of ours
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "faces-train.tfrecord-00000-of-00001").write_bytes(b"someone else's shard")
    (foreign / "dataset_info.json").write_text("{}")
    before = snapshot(foreign)
    fail(capsys, ["prepare", "folder", src, str(foreign)], str(foreign), "dataset_info.json",
         "faces-train.tfrecord-00000-of-00001", "no dataset written by adaface-jax")
    assert snapshot(foreign) == before
    # the output inside the source would become part of it
    fail(capsys, ["prepare", "folder", src, os.path.join(src, "out")], "inside the image folder")
    assert not os.path.exists(os.path.join(src, "out"))
    # --force replaces them, as documented
    ok(capsys, ["prepare", "folder", src, str(foreign), "--workers", "0", "--force"])
    assert read_manifest(str(foreign))["num_images"] == 4


def test_synthesize_replaces_only_an_earlier_verification_bin(tmp_path, capsys):
    out = tmp_path / "syn"
    out.mkdir()
    notes = out / "val.bin"
    notes.write_text("my notes, not a pickle")
    argv = ["synthesize", str(out), "--identities", "2", "--images-per-identity", "1", "--val-identities", "2",
            "--val-pairs", "2", "--val-name", "val.bin"]
    fail(capsys, argv, str(notes), "not an earlier .bin output")
    assert notes.read_text() == "my notes, not a pickle" and sorted(os.listdir(out)) == ["val.bin"]
    notes.unlink()
    first = ok(capsys, argv)
    assert first["verification"]["bin"] == str(notes) and read_manifest(str(out))["verification"]["bin"] == "val.bin"
    ok(capsys, argv)  # the same source again: the earlier .bin is replaced
    fail(capsys, argv[:-1] + ["val.txt"], "--val-name", "ending in .bin")


def test_prepare_bin_replaces_only_earlier_cache_files(tmp_path, capsys):
    import cv2

    from data_pipeline.bin_reader import _cache_key, write_bin
    face = cv2.imencode(".png", np.full((112, 112, 3), 100, np.uint8))[1].tobytes()
    path = tmp_path / "lfw.bin"
    write_bin(str(path), [face] * 4, [True, False])
    cache = tmp_path / "cache"
    cache.mkdir()
    squatter = cache / f"lfw.{_cache_key(str(path))}.images.npy"
    squatter.write_text("not an array")
    fail(capsys, ["prepare", "bin", str(path), str(cache)], str(squatter), "not an earlier .npy output")
    assert squatter.read_text() == "not an array"
    squatter.unlink()
    assert ok(capsys, ["prepare", "bin", str(path), str(cache)])["pairs"] == 2
    assert ok(capsys, ["prepare", "bin", str(path), str(cache)])["pairs"] == 2  # read from the cache


def test_paths_are_checked_before_anything_is_created(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = identities(tmp_path / "src", classes=2)
    fail(capsys, ["prepare", "folder", src, "gs:/bucket/ds"], "gs:/bucket/ds", "two slashes")
    fail(capsys, ["prepare", "folder", "gs:/bucket/imgs", "out"], "gs:/bucket/imgs")
    fail(capsys, ["synthesize", "gs:/bucket/syn"], "gs:/bucket/syn")
    fail(capsys, ["check", "s4://bucket/ds"], "unsupported URL scheme")
    fail(capsys, ["prepare", "bin", "x.bin", "gs:/bucket/cache"], "gs:/bucket/cache")
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no folder named gs: (or anything else) was made


# ------------------------------------------------------------------------------------ the manifest is last

def test_the_manifest_is_written_last(tmp_path, monkeypatch):
    src = identities(tmp_path / "src", classes=2)
    out = str(tmp_path / "out")

    def metadata_fails(data_dir, manifest):
        raise OSError(28, "No space left on device", os.path.join(data_dir, "dataset_info.json"))

    monkeypatch.setattr(convert.manifest_lib, "write_tfds_metadata", metadata_fails)
    with pytest.raises(OSError, match="No space left"):
        convert.convert_folder(src, out, num_workers=0, num_shards=2, show_progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(convert.InputError, match="unfinished conversion of folder"):
        read_manifest(out)
    # synthesize: the verification .bin belongs to the dataset, so it comes before the manifest too
    monkeypatch.undo()
    from data_pipeline import synthetic

    def bin_fails(*args, **kwargs):
        raise KeyboardInterrupt("killed while rendering the pairs")

    monkeypatch.setattr(synthetic, "write_verification_bin", bin_fails)
    syn = str(tmp_path / "syn")
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_synthetic_dataset(syn, 2, 1, show_progress=False,
                                          verification={"name": "v.bin", "num_identities": 2, "num_pairs": 2})
    assert os.path.isdir(syn) and not os.path.exists(os.path.join(syn, "manifest.json"))


def test_a_finished_dataset_stops_looking_finished_before_it_changes(tmp_path, capsys, monkeypatch):
    src = identities(tmp_path / "src", classes=3, per_class=2)
    out = str(tmp_path / "out")
    convert.convert_folder(src, out, num_workers=0, num_shards=2, show_progress=False)
    real = convert._write_task
    written = []

    def dies_in_the_second_shard(task):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(task["path"])
        return real(task)

    monkeypatch.setattr(convert, "_write_task", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):  # the same source re-sharded: every shard changes
        convert.convert_folder(src, out, num_workers=0, num_shards=3, show_progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # it would list shards that are gone
    fail(capsys, ["check", out], "manifest.json not found", "unfinished conversion of folder", "1 shard(s) finished")
    monkeypatch.undo()
    assert convert.convert_folder(src, out, num_workers=0, num_shards=3, show_progress=False)["resumed_shards"] == 1
    assert "OK, 6 records in 3 shard(s)" in ok(capsys, ["check", out, "--no-progress"])
    assert sorted(f for f in os.listdir(out) if "tfrecord" in f) == [f"faces-train.tfrecord-0000{i}-of-00003"
                                                                     for i in range(3)]


def test_training_input_refuses_a_folder_without_a_manifest(tmp_path):
    from data_pipeline.input import TrainInputConfig, make_train_dataset
    src = identities(tmp_path / "src", classes=2)
    out = tmp_path / "out"
    convert.convert_folder(src, str(out), num_workers=0, num_shards=2, show_progress=False)
    (out / "manifest.json").unlink()
    with pytest.raises(convert.InputError, match=r"manifest\.json not found: .* is not a dataset written by"):
        make_train_dataset(TrainInputConfig(data_dir=str(out), global_batch_size=2))
    with pytest.raises(convert.InputError, match="does not exist"):
        make_train_dataset(TrainInputConfig(data_dir=str(tmp_path / "nope"), global_batch_size=2))


# ------------------------------------------------------------------------------------ interrupted, resumed

# `adaface-jax ARGS` in a child that SIGKILLs itself (no cleanup, no exception handler runs) in the middle of
# the shard after the first KEEP finished ones, as a kill -9 or a preempted machine would.
KILLED_CHILD = """
import os, signal, sys
from adaface_jax.cli import main
from data_pipeline import convert
keep = int(sys.argv[1])
started = []
real_write, real_examples = convert._write_task, convert._examples
def write_task(task):
    started.append(task["path"])
    return real_write(task)
def examples(task, stats):
    for i, example in enumerate(real_examples(task, stats)):
        if len(started) > keep and i == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        yield example
convert._write_task, convert._examples = write_task, examples
sys.exit(main(sys.argv[2:]))
"""


def run_killed(argv, keep, env=None):
    proc = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(keep), *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": "",
                                            **(env or {})})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_a_killed_prepare_is_refused_until_resumed(tmp_path, capsys):
    src = identities(tmp_path / "src", classes=4, per_class=3)
    other = identities(tmp_path / "other", classes=2)
    out = str(tmp_path / "out")
    argv = ["prepare", "folder", src, out, "--workers", "0", "--num-shards", "4"]
    run_killed(argv, keep=2)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert len([f for f in os.listdir(out) if f.startswith("faces-train")]) == 2
    fail(capsys, ["check", out], "manifest.json not found", f"unfinished conversion of folder {src}",
         "2 shard(s) finished", "rerun the same")
    fail(capsys, ["prepare", "folder", other, out], "holds an unfinished conversion of folder", src, "--force")
    result = ok(capsys, argv)
    assert result["resumed_shards"] == 2 and result["num_images"] == 12
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # the killed shard's temporary file is gone
    assert "OK, 12 records in 4 shard(s)" in ok(capsys, ["check", out, "--no-progress"])


# ------------------------------------------------------------------------------------ parallel reads

def test_parallel_reads_give_the_same_batches(tmp_path):
    from data_pipeline.input import TrainInputConfig, make_train_iterator
    src = identities(tmp_path / "src", classes=4, per_class=4)
    out = str(tmp_path / "ds")
    convert.convert_folder(src, out, num_workers=0, num_shards=3, show_progress=False)
    batches = {}
    for reads in (0, -1, 3):  # sequential, tf.data.AUTOTUNE, three in flight
        cfg = TrainInputConfig(data_dir=out, global_batch_size=4, seed=2, image_size=16, shuffle_buffer=8,
                               num_streams=2, cycle_length=2, parallel_reads=reads)
        it = make_train_iterator(cfg)
        batches[reads] = [next(it) for _ in range(5)]  # past the epoch end (4 steps)
    for reads in (-1, 3):
        for a, b in zip(batches[0], batches[reads]):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
