"""Robust edges of the data commands: every bad input is ONE stderr line `adaface-jax <cmd>: error: ...`
naming the file/record (no traceback), exit status 1, no temporary files left, earlier outputs intact;
corrupt images never reach the TFRecords; `check` names bad records; JPEG decoding is bit-exact with
OpenCV; training survives (and exactly resumes over) an undecodable record."""
import glob
import hashlib
import json
import os
import pickle

import cv2
import numpy as np
import pytest

from data_pipeline import convert, recordio
from data_pipeline.manifest import read_manifest, shard_paths
from data_pipeline.tfrecord import make_example, write_tfrecord_atomic
from cli_fixtures import fail, ok
from data_fixtures import read_tfrecord_examples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), (size, size))
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def truncated(data: bytes) -> bytes:
    """A JPEG cut after its headers and part of the scan (starts like a JPEG; only decoding finds it)."""
    return data[: len(data) * 2 // 3]


def temporaries(root) -> list:
    return [p for p in glob.glob(os.path.join(str(root), "**", "*"), recursive=True) if ".tmp" in os.path.basename(p)]


def tree_digest(root) -> dict:
    return {os.path.relpath(p, root): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(str(root), "**", "*"), recursive=True) if os.path.isfile(p)}


def image_folder(root, classes=3, per_class=3, damage=None) -> dict:
    """root/<class>/<i>.jpg; damage: {(class, i): bytes transform}. Returns {(class, i): stored bytes}."""
    stored = {}
    for c in range(classes):
        os.makedirs(os.path.join(root, str(c)), exist_ok=True)
        for i in range(per_class):
            data = small_jpeg(10 * c + i)
            if damage and (c, i) in damage:
                data = damage[(c, i)](data)
            with open(os.path.join(root, str(c), f"{i}.jpg"), "wb") as f:
                f.write(data)
            stored[(c, i)] = data
    return stored


def tf_decodes(data: bytes) -> bool:
    import tensorflow as tf
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
        return True
    except tf.errors.InvalidArgumentError:
        return False


# ------------------------------------------------------------------------------------------- prepare rec

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


# ---------------------------------------------------------------------------------------- prepare folder

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


# ----------------------------------------------------------------------------------- never destroy data

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


def test_output_path_that_is_a_file(tmp_path, capsys):
    image_folder(tmp_path / "a", classes=2, per_class=1)
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    fail(capsys, ["prepare", "folder", str(tmp_path / "a"), str(target)], str(target), "not a directory")
    fail(capsys, ["synthesize", str(target), "--identities", "2", "--images-per-identity", "1"], str(target))
    assert target.read_text() == "keep me"


# ------------------------------------------------------------------------------------------------- .bin

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


# ------------------------------------------------------------------------------------------- synthesize

@pytest.mark.parametrize("args,needle", [(["--identities", "0"], "identities is 0"),
                                         (["--identities", "-3"], "identities is -3"),
                                         (["--images-per-identity", "0"], "images per identity is 0"),
                                         (["--severity", "2"], "severity 2.0"),
                                         (["--severity", "nan"], "severity nan"),
                                         (["--val-identities", "1"], "--val-identities 1")])
def test_synthesize_bad_counts(tmp_path, capsys, args, needle):
    out = tmp_path / "syn"
    fail(capsys, ["synthesize", str(out), "--identities", "2", "--images-per-identity", "1", *args], needle)
    assert not os.path.exists(out)


# ------------------------------------------------------------------------------------------------ check

def rewrite_shard(data_dir, shard, edit):
    """Rewrites one shard with edit(list of (image, label, index)) -> list, keeping the manifest consistent
    (as a dataset written by another tool would be)."""
    manifest = read_manifest(data_dir)
    path = os.path.join(data_dir, manifest["shards"][shard]["file"])
    import tensorflow as tf
    records = []
    for raw in tf.data.TFRecordDataset(path):
        f = tf.train.Example.FromString(raw.numpy()).features.feature
        records.append((f["image"].bytes_list.value[0], f["label"].int64_list.value[0], f["index"].int64_list.value[0]))
    records = edit(records)
    count, size, digest = write_tfrecord_atomic(path, (make_example(*r) for r in records))
    manifest["shards"][shard].update(num_images=count, num_bytes=size, sha256=digest)
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return records


@pytest.fixture
def small_dataset(tmp_path):
    image_folder(tmp_path / "src", classes=4, per_class=4)
    out = str(tmp_path / "ds")
    convert.convert_folder(str(tmp_path / "src"), out, num_workers=0, num_shards=2, show_progress=False)
    return out


def test_check_clean_then_flipped_byte_truncated_shard_and_corrupt_image(small_dataset, tmp_path, capsys):
    import shutil
    out = ok(capsys, ["check", small_dataset, "--no-progress"])
    assert "OK, 16 records in 2 shard(s)" in out
    shard0, shard1 = shard_paths(small_dataset)
    name0, name1 = os.path.basename(shard0), os.path.basename(shard1)

    flipped = str(tmp_path / "flipped")
    shutil.copytree(small_dataset, flipped)
    path = os.path.join(flipped, name1)
    raw = bytearray(open(path, "rb").read())
    # the third record of shard 1: walk the TFRecord framing (u64 length, u32 crc, data, u32 crc)
    pos = 0
    for _ in range(2):
        pos += 16 + int.from_bytes(raw[pos:pos + 8], "little")
    raw[pos + 12 + 40] ^= 0x20
    open(path, "wb").write(bytes(raw))
    fail(capsys, ["check", flipped, "--no-progress"], f"{name1} record 2", "unreadable TFRecord framing",
         f"{name1}: sha256 differs")

    cut = str(tmp_path / "cut")
    shutil.copytree(small_dataset, cut)
    path = os.path.join(cut, name0)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 30)
    n0 = read_manifest(cut)["shards"][0]["num_images"]
    fail(capsys, ["check", cut, "--no-progress"], f"{name0}: {n0 - 1} readable records, manifest says {n0}")

    bad_image = str(tmp_path / "badimage")
    shutil.copytree(small_dataset, bad_image)
    rewrite_shard(bad_image, 0, lambda recs: [(truncated(r[0]), r[1], r[2]) if i == 1 else r
                                              for i, r in enumerate(recs)])
    rewrite_shard(bad_image, 1, lambda recs: [(r[0], 9 if i == 0 else r[1], r[2]) for i, r in enumerate(recs)])
    line = fail(capsys, ["check", bad_image, "--no-progress"], f"{name0} record 1: image does not decode",
                f"{name1} record 0: label 9 outside [0, 4)")
    assert "2 problem(s), 2 bad record(s)" in line


def test_check_missing_manifest(tmp_path, capsys):
    fail(capsys, ["check", str(tmp_path)], "manifest.json not found")
    (tmp_path / "manifest.json").write_text("{not json")
    fail(capsys, ["check", str(tmp_path)], "manifest.json", "not valid JSON")


# ----------------------------------------------------------------------------------- training decoder

def test_decode_matches_opencv_bit_exactly_on_real_faces(shared_data):
    import tensorflow as tf

    from data_pipeline.bin_reader import safe_unpickle_bin
    from data_pipeline.input import decode_bgr
    jpegs = [open(p, "rb").read() for p in sorted(glob.glob(str(shared_data / "yale_b_cropped" / "**" / "*.jpg"),
                                                            recursive=True))[:20]]
    bins, _ = safe_unpickle_bin(str(shared_data / "small_lfw.bin"))
    jpegs += [bytes(b) for b in bins[:40] if bytes(b[:3]) == b"\xff\xd8\xff"]
    assert len(jpegs) >= 30
    fast_differs = 0
    for data in jpegs:
        reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # the original's decoder
        h, w = reference.shape[:2]
        ours = decode_bgr(tf.constant(data), "RGB", h).numpy() if h == w else None
        if ours is not None:
            np.testing.assert_array_equal(ours, reference)
        from data_pipeline.input import decode_any
        np.testing.assert_array_equal(decode_any(tf.constant(data)).numpy()[..., ::-1], reference)
        fast = tf.io.decode_image(data, channels=3).numpy()[..., ::-1]
        fast_differs += int(not np.array_equal(fast, reference))
    assert fast_differs > 0  # the default (fast IDCT) decoder would not have passed this test


# -------------------------------------------------------------------------------- training survives it

def test_input_replaces_an_undecodable_record_deterministically(small_dataset):
    from data_pipeline.input import TrainInputConfig, make_train_iterator
    rewrite_shard(small_dataset, 0, lambda recs: [(b"<html>" if i == 2 else r[0], r[1], r[2])
                                                  for i, r in enumerate(recs)])
    cfg = TrainInputConfig(data_dir=small_dataset, global_batch_size=8, seed=1, image_size=16, shuffle_buffer=32,
                           augment=False)
    it = make_train_iterator(cfg)
    run = [next(it) for _ in range(4)]  # two epochs of 2 steps
    assert sum(b["bad_records"] for b in run) == 2  # seen once per epoch
    for b in run:
        for img in b["image"]:  # every image is a real decoded one (no black placeholder)
            assert np.abs(img).sum() > 0
    for start in (1, 2, 3):
        resumed = make_train_iterator(cfg, start_step=start)
        for step in range(start, 4):
            batch = next(resumed)
            np.testing.assert_array_equal(batch["image"], run[step]["image"])
            np.testing.assert_array_equal(batch["label"], run[step]["label"])
            assert batch["bad_records"] == run[step]["bad_records"]


def _train_config(data_dir, **kw):
    from adaface_jax.train.config_io import load_config
    c = load_config(os.path.join(REPO, "configs", "cpu_synthetic.py"))
    c.data.data_dir = data_dir
    settings = dict(num_classes=4, global_batch_size=8, log_every=1, progress=False, sample_grid=False,
                    evals__verification__every_epochs=0, model__arch="tiny", model__embedding_size=16, data__image_size=16,
                    checkpoint__every_steps=1, checkpoint__async_save=False)
    settings.update(kw)
    for k, v in settings.items():
        node = c
        *parents, leaf = k.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def test_training_survives_a_bad_record_counts_it_and_resumes_exactly(small_dataset, tmp_path):
    import jax

    from adaface_jax.train.loop import TooManyBadRecords, train
    rewrite_shard(small_dataset, 1, lambda recs: [(truncated(r[0]) if i == 0 else r[0], r[1], r[2])
                                                  for i, r in enumerate(recs)])
    devices = jax.devices()[:1]
    straight, state_a = train(_train_config(small_dataset, total_steps=4), str(tmp_path / "a"), devices=devices)
    assert straight["step"] == 4 and straight["bad_records"] == 2
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["train/bad_records"] == 2
    assert records[0]["train/bad_records"] + records[1]["train/bad_records"] == 1  # once in epoch 0

    train(_train_config(small_dataset, total_steps=2), str(tmp_path / "b"), devices=devices)
    resumed, state_b = train(_train_config(small_dataset, total_steps=4), str(tmp_path / "b"), devices=devices)
    assert resumed["bad_records"] == 2
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(state_a.params)),
                    jax.tree_util.tree_leaves(jax.device_get(state_b.params))):
        np.testing.assert_array_equal(x, y)

    with pytest.raises(TooManyBadRecords, match=r"1 records of .* failed to decode by step \d, more than "
                                                r"config.data.max_bad_records=0"):
        train(_train_config(small_dataset, total_steps=4, data__max_bad_records=0), str(tmp_path / "c"),
              devices=devices)
