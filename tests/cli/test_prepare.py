"""`adaface-jax prepare` (rec, folder, list, bin): what it writes, checked against its inputs; which layouts and files
it refuses or skips, each in one line; damaged records and images; outputs it never replaces; a killed run resumes."""
import glob
import hashlib
import json
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest

from adaface_jax.cli import main
from tests.support.cli_fixtures import fail, ok
from data_pipeline import recordio
from data_pipeline.manifest import read_manifest, shard_paths
from tests.support import REPO
from tests.support.cli_output import one_error_line
from tests.support.data_fixtures import jpeg, read_tfrecord_examples
from tests.support.datasets import KILLED_CHILD, identities, image_folder, images, small_jpeg, truncated
from tests.support.datasets import manifest_json as _manifest
from tests.support.datasets import stored_examples as _examples


def temporaries(root) -> list:
    return [p for p in glob.glob(os.path.join(str(root), "**", "*"), recursive=True) if ".tmp" in os.path.basename(p)]


def tree_digest(root) -> dict:
    return {os.path.relpath(p, root): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(str(root), "**", "*"), recursive=True) if os.path.isfile(p)}


def tf_decodes(data: bytes) -> bool:
    import tensorflow as tf
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
        return True
    except tf.errors.InvalidArgumentError:
        return False


def snapshot(root) -> dict:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read() if not stat.S_ISFIFO(os.stat(path).st_mode) \
                else "fifo"
    return out


# rec


def _write_rec(path, items):
    """An InsightFace .rec written by hand (dmlc RecordIO framing + mxnet IRHeader 'IfQQ'), no .idx."""
    with open(path, "wb") as f:
        for i, (label, payload) in enumerate(items):
            data = struct.pack("<IfQQ", 0, float(label), i, 0) + payload
            words = np.frombuffer(data[: len(data) // 4 * 4], "<u4")
            assert not (words == 0xCED7230A).any()  # keep the framing trivial: no magic inside the payload
            f.write(struct.pack("<II", 0xCED7230A, len(data)) + data + b"\0" * (-len(data) % 4))


def test_prepare_rec_from_the_command_line(tmp_path, capsys):
    labels = [0, 2, 1, 2, 0, 1, 2]
    items = [(lab, jpeg(i)) for i, lab in enumerate(labels)]
    _write_rec(tmp_path / "train.rec", items)
    out = tmp_path / "rec_out"
    assert main(["prepare", "rec", str(tmp_path / "train.rec"), str(out), "--workers", "0", "--num-shards", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["num_images"] == 7 and printed["num_classes"] == 3 and printed["shards"] == 2
    m = _manifest(out)
    assert m["num_images"] == 7 and m["num_classes"] == 3 and m["class_counts"] == [2, 2, 3]
    got = sorted(_examples(out).values(), key=lambda e: e[0])
    assert got == sorted(((payload, lab) for lab, payload in items), key=lambda e: e[0])  # bytes as stored


def insightface_folder(root, n=8, classes=4, prop=None) -> tuple[str, list]:
    """faces_emore-like folder: train.rec, train.idx, property."""
    os.makedirs(root, exist_ok=True)
    items = [(small_jpeg(i), i % classes) for i in range(n)]
    recordio.write_insightface_rec(os.path.join(root, "train.rec"), os.path.join(root, "train.idx"), items)
    with open(os.path.join(root, "property"), "w") as f:
        f.write(prop or f"{classes},112,112")
    return str(root), items


def test_prepare_rec_accepts_the_insightface_folder_and_reads_property(tmp_path, capsys):
    src, items = insightface_folder(tmp_path / "faces_emore", n=8, classes=4, prop="6,112,112")
    # the header record says 4 classes: property must agree
    fail(capsys, ["prepare", "rec", src, str(tmp_path / "bad"), "--workers", "0"],
         os.path.join(src, "property"), "6 classes", "says 4")
    assert not os.path.exists(tmp_path / "bad")
    with open(os.path.join(src, "property"), "w") as f:
        f.write("4,112,112\n")
    out = str(tmp_path / "ds")
    result = ok(capsys, ["prepare", "rec", src, out, "--workers", "0", "--num-shards", "2"])
    assert result["num_images"] == 8 and result["num_classes"] == 4
    manifest = read_manifest(out)
    assert manifest["source"]["path"] == os.path.join(src, "train.rec")
    assert manifest["source"]["property"]["num_classes"] == 4
    examples = read_tfrecord_examples(shard_paths(out))
    assert {k: v for k, v in examples.items()} == {k + 1: items[k] for k in range(8)}
    with open(os.path.join(src, "property"), "w") as f:
        f.write("four,112,112\n")
    fail(capsys, ["prepare", "rec", src, str(tmp_path / "bad2")], "property", "num_classes,height,width")


def test_truncated_rec_names_record_and_offset_and_skip_corrupt_converts_the_rest(tmp_path, capsys):
    src, items = insightface_folder(tmp_path / "faces", n=8, classes=4)
    rec = os.path.join(src, "train.rec")
    offsets = recordio.read_idx(os.path.join(src, "train.idx"))
    cut = offsets[6] + 12  # inside record 6; records 7 and 8 start past the end
    with open(rec, "r+b") as f:
        f.truncate(cut)
    line = fail(capsys, ["prepare", "rec", src, str(tmp_path / "o1")], rec, "record 7", f"byte offset {offsets[7]}",
                f"({cut} bytes)", "2 of 9")
    assert "--skip-corrupt" in line and not os.path.exists(tmp_path / "o1")
    out = str(tmp_path / "o2")
    result = ok(capsys, ["prepare", "rec", src, out, "--skip-corrupt", "--workers", "0"])
    manifest = read_manifest(out)
    assert result["num_images"] == 5 and manifest["num_skipped_corrupt"] == 3
    assert sorted((s["index"], s["offset"]) for s in manifest["skipped_corrupt"]) == \
        [(6, offsets[6]), (7, offsets[7]), (8, offsets[8])]
    examples = read_tfrecord_examples(shard_paths(out))
    assert examples == {k: items[k - 1] for k in range(1, 6)}
    # without the .idx-past-the-end records, the cut record itself is named
    with open(os.path.join(src, "train.idx"), "w") as f:
        f.writelines(f"{k}\t{offsets[k]}\n" for k in range(7))
    with open(os.path.join(src, "property"), "w") as f:
        f.write("4,112,112")
    fail(capsys, ["prepare", "rec", src, str(tmp_path / "o3")], "is truncated", "corrupt record 6",
         f"byte offset {offsets[6]}")


def test_idx_pointing_past_the_end(tmp_path, capsys):
    src, _ = insightface_folder(tmp_path / "faces", n=4)
    size = os.path.getsize(os.path.join(src, "train.rec"))
    with open(os.path.join(src, "train.idx"), "a") as f:
        f.write(f"3\t{size + 4096}\n")  # record 3 now said to lie past the end
    fail(capsys, ["prepare", "rec", src, str(tmp_path / "o")], "record 3", f"byte offset {size + 4096}",
         f"({size} bytes)")
    with open(os.path.join(src, "train.idx"), "a") as f:
        f.write("5 x\n")
    fail(capsys, ["prepare", "rec", src, str(tmp_path / "o")], "train.idx:7", "key<TAB>byte offset")


def _rec_with_bad_record(tmp_path, key=3, damage=lambda d: d[:8] + b"garbage!" * 4):
    items = [(small_jpeg(i), i % 2) for i in range(6)]
    items[key - 1] = (damage(items[key - 1][0]), items[key - 1][1])
    rec = str(tmp_path / "d.rec")
    recordio.write_insightface_rec(rec, str(tmp_path / "d.idx"), items)
    return rec, recordio.read_idx(str(tmp_path / "d.idx")), items


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_image_record_is_one_line_also_from_a_worker_process(tmp_path, capsys, workers):
    rec, offsets, items = _rec_with_bad_record(tmp_path, key=3, damage=truncated)
    assert not tf_decodes(items[2][0])  # the JPEG signature is intact: only a full decode finds the damage
    out = tmp_path / "out"
    fail(capsys, ["prepare", "rec", rec, str(out), "--workers", workers, "--num-shards", "2"],
         rec, "corrupt record 3", f"byte offset {offsets[3]}", "does not decode with TensorFlow")
    assert not temporaries(tmp_path) and not os.path.exists(os.path.join(out, "manifest.json"))


def test_skip_corrupt_keeps_undecodable_images_out_of_the_tfrecords(tmp_path, capsys):
    rec, offsets, items = _rec_with_bad_record(tmp_path, key=3, damage=truncated)
    out = str(tmp_path / "out")
    ok(capsys, ["prepare", "rec", rec, out, "--workers", "0", "--skip-corrupt"])
    manifest = read_manifest(out)
    assert manifest["num_skipped_corrupt"] == 1 and manifest["skipped_corrupt"][0]["index"] == 3
    examples = read_tfrecord_examples(shard_paths(out))
    assert sorted(examples) == [1, 2, 4, 5, 6] and all(tf_decodes(img) for img, _ in examples.values())


# folder and list


def test_prepare_folder_and_list_from_the_command_line(tmp_path):
    root = tmp_path / "faces"
    written = {}  # bytes -> identity folder
    for person, n in (("bob", 3), ("alice", 2), ("carol", 4)):
        (root / person).mkdir(parents=True)
        for k in range(n):
            data = jpeg(100 * len(person) + 10 * n + k)
            (root / person / f"{k}.jpg").write_bytes(data)
            written[data] = person
    out = tmp_path / "folder_out"
    assert main(["prepare", "folder", str(root), str(out), "--workers", "0"]) == 0
    m = _manifest(out)
    assert m["num_images"] == 9 and m["class_names"] == ["alice", "bob", "carol"] and m["class_counts"] == [2, 3, 4]
    ex = _examples(out)
    assert len(ex) == 9 and all(m["class_names"][lab] == written[data] for data, lab in ex.values())

    # list: path<TAB>label relative to --root, labels kept as given
    lines = [f"{p}/{k}.jpg\t{lab}" for p, lab, n in (("bob", 5, 3), ("carol", 1, 4)) for k in range(n)]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out2 = tmp_path / "list_out"
    assert main(["prepare", "list", str(tmp_path / "list.txt"), str(out2), "--root", str(root), "--workers", "0",
                 "--no-shuffle"]) == 0
    m2 = _manifest(out2)
    assert m2["num_images"] == 7 and m2["num_classes"] == 6
    ex2 = _examples(out2)
    want = {(root / line.split("\t")[0]).read_bytes(): int(line.split("\t")[1]) for line in lines}
    assert sorted(ex2.values()) == sorted(want.items())


def test_prepare_folder_bad_images(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    fail(capsys, ["prepare", "folder", str(empty), str(tmp_path / "o")], str(empty), "no identity subfolders")
    (empty / "alice").mkdir()
    fail(capsys, ["prepare", "folder", str(empty), str(tmp_path / "o")], str(empty), "no images")
    fail(capsys, ["prepare", "folder", str(tmp_path / "nope"), str(tmp_path / "o")], "nope", "does not exist")
    cases = {"html": lambda d: b"<!DOCTYPE html><html><body>Not Found</body></html>",
             "empty": lambda d: b"", "truncated": truncated}
    for name, damage in cases.items():
        src = tmp_path / f"src_{name}"
        image_folder(src, damage={(1, 2): damage})
        bad = os.path.join(str(src), "1", "2.jpg")
        fail(capsys, ["prepare", "folder", str(src), str(tmp_path / f"o_{name}"), "--workers", "0"], bad,
             "--skip-corrupt")
        assert not os.path.exists(tmp_path / f"o_{name}")
        out = tmp_path / f"s_{name}"
        result = ok(capsys, ["prepare", "folder", str(src), str(out), "--skip-corrupt", "--workers", "0"])
        assert result["num_images"] == 8 and result["num_skipped_corrupt"] == 1, name
        manifest = read_manifest(str(out))
        assert manifest["skipped_corrupt"][0]["path"] == bad
        examples = read_tfrecord_examples(shard_paths(str(out)))
        assert len(examples) == 8 and all(tf_decodes(img) for img, _ in examples.values())
    assert not temporaries(tmp_path)


def test_prepare_list_errors_name_the_line(tmp_path, capsys):
    image_folder(tmp_path / "img", classes=2, per_class=2)
    lst = tmp_path / "list.txt"
    out = str(tmp_path / "o")

    def with_lines(*lines):
        lst.write_text("".join(line + "\n" for line in lines))
        return ["prepare", "list", str(lst), out, "--root", str(tmp_path / "img"), "--workers", "0"]

    fail(capsys, with_lines("0/0.jpg\t0", "0/9.jpg\t0"), f"{lst}:2", "9.jpg", "does not exist")
    fail(capsys, with_lines("0/0.jpg\t0", "just-a-path"), f"{lst}:2", "path<TAB>integer label")
    fail(capsys, with_lines("0/0.jpg\tzero"), f"{lst}:1", "path<TAB>integer label")
    fail(capsys, with_lines("0/0.jpg\t1.5"), f"{lst}:1", "integer label")
    fail(capsys, with_lines("0/0.jpg\t-1"), f"{lst}:1", "negative label -1")
    fail(capsys, with_lines("", "  "), str(lst), "no entries")
    fail(capsys, ["prepare", "list", str(tmp_path / "missing.txt"), out], "missing.txt", "No such file")
    assert not os.path.exists(out)
    ok(capsys, with_lines("0/0.jpg\t0", "1/1.jpg\t1"))


# folder layouts


def test_prepare_folder_refuses_layouts_that_would_train_on_the_wrong_classes(tmp_path, capsys):
    """A wrapper folder (casia/CASIA-WebFace/<id>/<img>, the way archives unpack), images with no identity
    folders, identities in a format we do not read: one line each naming the folder, nothing written."""
    import cv2

    face = cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes()
    for ident in ("0001", "0002"):
        (tmp_path / "casia" / "CASIA-WebFace" / ident).mkdir(parents=True)
        (tmp_path / "casia" / "CASIA-WebFace" / ident / "001.jpg").write_bytes(face)
    (tmp_path / "flat").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "flat" / name).write_bytes(face)
    for ident in ("p1", "p2"):
        (tmp_path / "phone" / ident).mkdir(parents=True)
        (tmp_path / "phone" / ident / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    out = tmp_path / "out"
    cases = {"casia": [str(tmp_path / "casia" / "CASIA-WebFace"), "pass"],
             "flat": ["2 images directly", "no identity folders"],
             "phone": ["2 other files: 2 .heic"]}
    for name, needles in cases.items():
        assert main(["prepare", "folder", str(tmp_path / name), str(out)]) == 1, name
        one_error_line(capsys, "prepare", str(tmp_path / name), *needles)
        assert not out.exists(), name


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


# never destroy data


def test_prepare_refuses_to_replace_a_dataset_of_another_source(tmp_path, capsys):
    image_folder(tmp_path / "a", classes=2, per_class=2)
    image_folder(tmp_path / "b", classes=3, per_class=2)
    out = str(tmp_path / "out")
    ok(capsys, ["prepare", "folder", str(tmp_path / "a"), out, "--workers", "0", "--num-shards", "2"])
    before = tree_digest(out)
    fail(capsys, ["prepare", "folder", str(tmp_path / "b"), out, "--workers", "0"], out, f"folder {tmp_path / 'a'}",
         "--force")
    rec, _, _ = _rec_with_bad_record(tmp_path, damage=lambda d: d)
    fail(capsys, ["prepare", "rec", rec, out, "--workers", "0"], out, f"folder {tmp_path / 'a'}")
    fail(capsys, ["synthesize", out, "--identities", "2", "--images-per-identity", "2"], out, "folder")
    assert tree_digest(out) == before  # earlier output intact
    # the same source resumes (every shard verified and reused)
    assert ok(capsys, ["prepare", "folder", str(tmp_path / "a"), out, "--workers", "0", "--num-shards", "2"]
              )["resumed_shards"] == 2
    # the same path with other content is refused too
    image_folder(tmp_path / "a", classes=3, per_class=2)
    fail(capsys, ["prepare", "folder", str(tmp_path / "a"), out, "--workers", "0"], "content has changed")
    result = ok(capsys, ["prepare", "folder", str(tmp_path / "b"), out, "--workers", "0", "--force"])
    assert result["num_images"] == 6 and read_manifest(out)["source"]["path"] == str(tmp_path / "b")
    assert len(read_tfrecord_examples(shard_paths(out))) == 6  # no shard of the old dataset is listed


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


# .bin


def test_bad_bin_files(tmp_path, capsys):
    cache = tmp_path / "cache"
    notpickle = tmp_path / "html.bin"
    notpickle.write_bytes(b"<html>404</html>")
    fail(capsys, ["prepare", "bin", str(notpickle), str(cache)], str(notpickle), "not a readable pickle")
    wrong = tmp_path / "dict.bin"
    wrong.write_bytes(pickle.dumps({"a": 1}))
    fail(capsys, ["prepare", "bin", str(wrong), str(cache)], str(wrong), "expected a pickled 2-tuple")
    good = [small_jpeg(i, 112) for i in range(4)]
    elem = tmp_path / "elem.bin"
    elem.write_bytes(pickle.dumps((good[:2] + [b"", good[3]], [True, False])))
    fail(capsys, ["prepare", "bin", str(elem), str(cache)], str(elem), "element 2")
    elem.write_bytes(pickle.dumps((good[:3] + [truncated(good[3])[:40]], [True, False])))
    fail(capsys, ["prepare", "bin", str(elem), str(cache)], str(elem), "element 3", "not a decodable image")
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    fail(capsys, ["prepare", "bin", str(evil), str(cache)], "refusing to load global os.system")
    assert not glob.glob(str(cache / "*.npy")) and not temporaries(tmp_path)


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


# interrupted, resumed


def run_killed(argv, keep, env=None):
    proc = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(keep), *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
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
