"""`adaface-jax check`: a clean dataset passes; a flipped byte, a truncated shard, an undecodable image and a label
out of range are each named; a missing or malformed manifest is one line."""
import os

from tests.support.cli_fixtures import fail, ok
from data_pipeline.manifest import read_manifest, shard_paths
from tests.support.datasets import rewrite_shard, truncated


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
