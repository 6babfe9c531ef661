"""Folder and list converters on real ORL faces; interrupted conversion resumes; the manifest, the finished marker,
is written last and removed first."""
import os

import cv2
import numpy as np
import pytest

from tests.support.cli_fixtures import fail, ok
from data_pipeline import prepare
from data_pipeline.manifest import read_manifest, shard_paths
from tests.support.data_fixtures import read_tfrecord_examples
from tests.support.datasets import identities


@pytest.fixture
def orl_folder(shared_data, tmp_path):
    """6 ORL identities x 10 under folder names whose string order differs from their int order."""
    root = tmp_path / "faces"
    names = ["1", "10", "2", "3", "20", "11"]
    for k, name in enumerate(names):
        os.makedirs(root / name)
        for i in range(1, 11):
            os.symlink(shared_data / "orl_faces" / f"s{k + 1}" / f"{i}.pgm", root / name / f"{i}.pgm")
    return root, names


def test_folder_counts_labels_and_pixels(orl_folder, tmp_path):
    root, names = orl_folder
    out = str(tmp_path / "out")
    manifest = prepare.convert_folder(str(root), out, num_workers=0, num_shards=2, show_progress=False)
    assert manifest["num_images"] == 60 and manifest["num_classes"] == 6
    assert manifest["class_names"] == sorted(names) == ["1", "10", "11", "2", "20", "3"]  # lexicographic
    assert manifest["class_counts"] == [10] * 6 and manifest["num_re_encoded_png"] == 60
    examples = read_tfrecord_examples(shard_paths(out))
    assert len(examples) == 60
    plan = prepare.plan_folder(str(root))
    for path, label, index in plan.items:
        image, stored_label = examples[index]
        assert stored_label == label == sorted(names).index(os.path.basename(os.path.dirname(path)))
        # PGM is re-encoded losslessly: decoding gives the original grey pixels
        decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(decoded, cv2.imread(path, cv2.IMREAD_UNCHANGED))


def test_list_file(shared_data, tmp_path):
    src = shared_data / "yale_b_cropped"
    people = sorted(os.listdir(src))[:2]
    lines, files = [], []
    for label, person in enumerate(people):
        for f in sorted(os.listdir(src / person))[:5]:
            lines.append(f"{person}/{f}\t{label + 3}")
            files.append((str(src / person / f), label + 3))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    manifest = prepare.convert_list(str(listing), out, root=str(src), num_workers=0, show_progress=False)
    assert manifest["num_images"] == 10 and manifest["num_classes"] == 5 and manifest["num_re_encoded_png"] == 0
    examples = read_tfrecord_examples(shard_paths(out))
    for index, (path, label) in enumerate(files):
        assert examples[index] == (open(path, "rb").read(), label)  # JPEG bytes copied as stored
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{people[0]}/x.jpg\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: expected 'path<TAB>integer label'"):
        prepare.convert_list(str(bad), str(tmp_path / "o2"), root=str(src), num_workers=0, show_progress=False)


def test_interrupted_conversion_resumes(orl_folder, tmp_path, monkeypatch):
    root, _ = orl_folder
    out = str(tmp_path / "out")
    original = prepare._records_files
    calls = []

    def failing(task, stats):
        calls.append(task["path"])
        if len(calls) == 3:  # the third shard dies half way through
            for n, record in enumerate(original(task, stats)):
                if n == 5:
                    raise KeyboardInterrupt("simulated kill")
                yield record
        yield from original(task, stats)

    monkeypatch.setattr(prepare, "_records_files", failing)  # the producer plan_folder puts in the plan
    with pytest.raises(KeyboardInterrupt):
        prepare.convert_folder(str(root), out, num_workers=0, num_shards=4, show_progress=False)
    finished = sorted(f for f in os.listdir(out) if "tfrecord" in f)
    assert len(finished) == 2 and not [f for f in os.listdir(out) if ".tmp" in f]  # no partial shard left
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in finished}
    monkeypatch.setattr(prepare, "_records_files", original)
    # corrupt one finished shard: the resume must verify its checksum and rewrite it
    with open(os.path.join(out, finished[1]), "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")
    manifest = prepare.convert_folder(str(root), out, num_workers=0, num_shards=4, show_progress=False)
    assert manifest["resumed_shards"] == 1 and manifest["num_images"] == 60
    assert os.stat(os.path.join(out, finished[0])).st_mtime_ns == mtimes[finished[0]]
    assert len(read_tfrecord_examples(shard_paths(out))) == 60
    again = prepare.convert_folder(str(root), out, num_workers=0, num_shards=4, show_progress=False)
    assert again["resumed_shards"] == 4 and read_manifest(out)["num_images"] == 60


def test_parallel_workers_match_in_process(orl_folder, tmp_path):
    root, _ = orl_folder
    a = prepare.convert_folder(str(root), str(tmp_path / "a"), num_workers=0, num_shards=2, show_progress=False)
    b = prepare.convert_folder(str(root), str(tmp_path / "b"), num_workers=2, num_shards=2, show_progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_the_manifest_is_written_last(tmp_path, monkeypatch):
    src = identities(tmp_path / "src", classes=2)
    out = str(tmp_path / "out")

    def metadata_fails(data_dir, manifest):
        raise OSError(28, "No space left on device", os.path.join(data_dir, "dataset_info.json"))

    monkeypatch.setattr(prepare.manifest_lib, "write_tfds_metadata", metadata_fails)
    with pytest.raises(OSError, match="No space left"):
        prepare.convert_folder(src, out, num_workers=0, num_shards=2, show_progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(prepare.InputError, match="unfinished conversion of folder"):
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
    prepare.convert_folder(src, out, num_workers=0, num_shards=2, show_progress=False)
    real = prepare._write_task
    written = []

    def dies_in_the_second_shard(task):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(task["path"])
        return real(task)

    monkeypatch.setattr(prepare, "_write_task", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):  # the same source re-sharded: every shard changes
        prepare.convert_folder(src, out, num_workers=0, num_shards=3, show_progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # it would list shards that are gone
    fail(capsys, ["check", out], "manifest.json not found", "unfinished conversion of folder", "1 shard(s) finished")
    monkeypatch.undo()
    assert prepare.convert_folder(src, out, num_workers=0, num_shards=3, show_progress=False)["resumed_shards"] == 1
    assert "OK, 6 records in 3 shard(s)" in ok(capsys, ["check", out, "--no-progress"])
    assert sorted(f for f in os.listdir(out) if "tfrecord" in f) == [f"faces-train.tfrecord-0000{i}-of-00003"
                                                                     for i in range(3)]
