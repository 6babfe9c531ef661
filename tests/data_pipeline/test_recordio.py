"""RecordIO reader/writer and .rec -> TFRecord conversion (hand-built records, corruption, tfds readability)."""
import os
import struct

import pytest

from data_pipeline import prepare, recordio
from data_pipeline.manifest import read_manifest, shard_paths
from tests.support.data_fixtures import jpeg, read_tfrecord_examples


def test_pack_layout_matches_hand_computed_bytes():
    rec = recordio.pack(7.0, b"abc", id=5, id2=0)
    assert rec == struct.pack("<IfQQ", 0, 7.0, 5, 0) + b"abc"
    rec = recordio.pack([3.0, 9.0], b"xy")
    assert rec == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<ff", 3.0, 9.0) + b"xy"
    header, payload = recordio.unpack(rec)
    assert header.flag == 2 and header.label.tolist() == [3.0, 9.0] and payload == b"xy"
    assert recordio.header_label(header) == 3
    # framing: magic, length word, data, zero padding to 4 bytes
    assert recordio.encode_record(b"abcde") == struct.pack("<II", 0xCED7230A, 5) + b"abcde\0\0\0"


def test_payload_containing_magic_is_split_and_rejoined(tmp_path):
    magic = struct.pack("<I", 0xCED7230A)
    data = b"abcd" + magic + b"efgh" + magic + b"z"
    framed = recordio.encode_record(data)
    # dmlc-core layout: parts flagged 1 (first), 2 (middle), 3 (last), magic implied between them
    words = struct.unpack_from("<II", framed, 0)
    assert words == (0xCED7230A, (1 << 29) | 4)
    with recordio.RecordIOWriter(str(tmp_path / "m.rec"), str(tmp_path / "m.idx")) as w:
        w.write(data, key=0)
        w.write(b"tail", key=1)
    with recordio.RecordIOReader(str(tmp_path / "m.rec")) as r:
        assert r.read_idx(0) == data and r.read_idx(1) == b"tail"


@pytest.mark.parametrize("with_idx", [True, False])
def test_insightface_rec_roundtrip(tmp_path, with_idx):
    items = [(jpeg(i), i % 3) for i in range(7)]
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    recordio.write_insightface_rec(rec, idx, items, vector_labels=True)
    if not with_idx:
        os.remove(idx)
    with recordio.RecordIOReader(rec) as r:
        assert (r.idx_path is not None) == with_idx
        header, _ = r.read_image_record(0)
        assert header.flag == 2 and header.label.tolist() == [8.0, 11.0]  # [N+1, N+1+C]
        keys = r.image_keys()
        assert keys == list(range(1, 8))
        for key in keys:
            header, payload = r.read_image_record(key)
            assert payload == items[key - 1][0]
            assert recordio.header_label(header) == items[key - 1][1]
            assert header.label.tolist() == [items[key - 1][1], key]  # vector label, [0] is the class


def test_no_header_record_uses_all_keys(tmp_path):
    rec = str(tmp_path / "plain.rec")
    with recordio.RecordIOWriter(rec, str(tmp_path / "plain.idx")) as w:
        for k in range(3):
            w.write(recordio.pack(float(k), jpeg(k)), key=k)
    with recordio.RecordIOReader(rec) as r:
        assert r.image_keys() == [0, 1, 2]


def _corrupt_rec(tmp_path, with_idx=True):
    items = [(jpeg(i), i % 2) for i in range(6)]
    rec, idx = str(tmp_path / "c.rec"), str(tmp_path / "c.idx")
    recordio.write_insightface_rec(rec, idx, items)
    offsets = recordio.read_idx(idx)
    blob = bytearray(open(rec, "rb").read())
    blob[offsets[3]:offsets[3] + 4] = b"\0\0\0\0"  # destroy record 3's magic
    open(rec, "wb").write(bytes(blob))
    if not with_idx:
        os.remove(idx)
    return rec, offsets, items


def test_corrupt_record_error_names_index_and_offset(tmp_path):
    rec, offsets, _ = _corrupt_rec(tmp_path)
    with recordio.RecordIOReader(rec) as r:
        with pytest.raises(recordio.CorruptRecordError, match=rf"corrupt record 3 at byte offset {offsets[3]}"):
            r.read_image_record(3)
    with pytest.raises(recordio.CorruptRecordError, match=rf"corrupt record 3 at byte offset {offsets[3]}"):
        prepare.convert_rec(rec, str(tmp_path / "out"), num_workers=0, show_progress=False)


def test_truncated_file_scan(tmp_path):
    items = [(jpeg(i), 0) for i in range(3)]
    rec = str(tmp_path / "t.rec")
    recordio.write_insightface_rec(rec, None, items)
    size = os.path.getsize(rec)
    with open(rec, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(recordio.CorruptRecordError, match="corrupt record 3 at byte offset .*truncated"):
        recordio.RecordIOReader(rec)
    with recordio.RecordIOReader(rec, skip_corrupt=True) as r:
        assert len(r) == 3 and r.corrupt[0][0] == 3


@pytest.mark.parametrize("with_idx", [True, False])
def test_skip_corrupt_counts_it(tmp_path, with_idx):
    rec, offsets, items = _corrupt_rec(tmp_path, with_idx)
    out = str(tmp_path / "out")
    manifest = prepare.convert_rec(rec, out, num_workers=0, num_shards=2, skip_corrupt=True, show_progress=False)
    assert manifest["num_skipped_corrupt"] == 1 and manifest["num_images"] == 5
    assert manifest["skipped_corrupt"][0]["offset"] == offsets[3]
    examples = read_tfrecord_examples(shard_paths(out))
    assert sorted(examples) == [1, 2, 4, 5, 6]
    for key, (image, label) in examples.items():
        assert image == items[key - 1][0] and label == items[key - 1][1]


def test_rec_to_tfrecord_is_byte_exact_and_tfds_readable(tmp_path):
    import tensorflow_datasets as tfds

    items = [(jpeg(i), i % 4) for i in range(30)]
    rec = str(tmp_path / "train.rec")
    recordio.write_insightface_rec(rec, str(tmp_path / "train.idx"), items)
    out = str(tmp_path / "ds")
    manifest = prepare.convert_rec(rec, out, num_workers=0, num_shards=3, show_progress=False)
    assert manifest == read_manifest(out)
    assert manifest["num_images"] == 30 and manifest["num_classes"] == 4 and manifest["channel_order"] == "RGB"
    assert [s["num_images"] for s in manifest["shards"]] and sum(s["num_images"] for s in manifest["shards"]) == 30
    assert manifest["class_counts"] == [8, 8, 7, 7]
    examples = read_tfrecord_examples(shard_paths(out))
    assert sorted(examples) == list(range(1, 31))
    for key, (image, label) in examples.items():
        assert image == items[key - 1][0] and label == items[key - 1][1]  # stored bytes, no re-encode
    ds = tfds.builder_from_directory(out).as_dataset(split="train")
    seen = {int(e["index"]): (int(e["label"]), e["image"].shape) for e in ds}
    assert len(seen) == 30 and all(seen[k][0] == items[k - 1][1] and seen[k][1] == (112, 112, 3) for k in seen)
