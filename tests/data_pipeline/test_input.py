"""Training input pipeline: batch contract, BGR order, bit-exact JPEG decoding, determinism and resume, an
undecodable record replaced, parallel reads, multi-host split, preview grid, a folder without a manifest."""
import glob
import os

import cv2
import numpy as np
import pytest

from data_pipeline import prepare, synthetic
from data_pipeline.input import (TrainInputConfig, host_assignment, make_train_iterator, read_manifest,
                                 save_augmentation_grid, steps_per_epoch)
from tests.support.datasets import identities, rewrite_shard, write_small_dataset

COLOURS_BGR = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 128, 255)]  # blue, green, red, orange


@pytest.fixture(scope="module")
def colour_dataset(tmp_path_factory):
    """4 classes x 10 PNGs of solid BGR colours (written with cv2, so the files hold true colours)."""
    root = tmp_path_factory.mktemp("colours")
    for label, colour in enumerate(COLOURS_BGR):
        os.makedirs(root / "src" / f"c{label}")
        for k in range(10):
            image = np.zeros((112, 112, 3), np.uint8) + np.array(colour, np.uint8)
            image[0, 0] = k  # distinct pixels so examples differ
            cv2.imwrite(str(root / "src" / f"c{label}" / f"{k}.png"), image)
    out = str(root / "ds")
    prepare.convert_folder(str(root / "src"), out, num_workers=0, num_shards=4, show_progress=False)
    return out


def test_batch_contract_and_bgr(colour_dataset):
    cfg = TrainInputConfig(data_dir=colour_dataset, global_batch_size=8, seed=0, augment=False, shuffle_buffer=64)
    assert steps_per_epoch(cfg) == 5
    manifest = read_manifest(colour_dataset)
    assert manifest["num_images"] == 40 and manifest["channel_order"] == "RGB" and len(manifest["shards"]) == 4
    it = make_train_iterator(cfg)
    labels = []
    for _ in range(5):
        batch = next(it)
        assert batch["image"].shape == (8, 112, 112, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        for image, label in zip(batch["image"], batch["label"]):
            expected = (np.array(COLOURS_BGR[label], np.float32) / 255.0 - 0.5) / 0.5
            np.testing.assert_allclose(image[56, 56], expected, atol=1e-6)  # BGR, normalised
        labels += batch["label"].tolist()
    assert sorted(labels) == sorted([k // 10 for k in range(40)])  # one epoch = every image once
    second_epoch = [next(it)["label"].tolist() for _ in range(5)]
    assert sorted(sum(second_epoch, [])) == sorted(labels) and sum(second_epoch, []) != labels  # reshuffled


def test_resume_yields_the_same_batches(colour_dataset):
    cfg = TrainInputConfig(data_dir=colour_dataset, global_batch_size=8, seed=3, shuffle_buffer=64,
                           crop_prob=0.5, lowres_prob=0.5, photometric_prob=0.5)
    it = make_train_iterator(cfg)
    run = [next(it) for _ in range(8)]  # crosses the epoch boundary (5 steps per epoch)
    for start in (3, 6):
        resumed = make_train_iterator(cfg, start_step=start)
        for step in range(start, 8):
            batch = next(resumed)
            np.testing.assert_array_equal(batch["label"], run[step]["label"])
            np.testing.assert_array_equal(batch["image"], run[step]["image"])
    other = next(make_train_iterator(TrainInputConfig(data_dir=colour_dataset, global_batch_size=8, seed=4,
                                                      shuffle_buffer=64)))
    assert not np.array_equal(other["image"], run[0]["image"])


def test_hosts_split_the_data(colour_dataset, tmp_path):
    """Two hosts run contiguous blocks of the 8 input streams (gcd(64, 8)): they read disjoint images, half each,
    and their rows concatenated in process order are the one-host global batch."""
    manifest = read_manifest(colour_dataset)
    seen, rows = [], []
    for p in range(2):
        shards, streams, count = host_assignment(manifest, p, 2, 64, 8)
        assert streams == list(range(4 * p, 4 * p + 4)) and count == 20
        starts = np.cumsum([0] + [sh["num_images"] for sh in manifest["shards"]])
        # the shards holding records [20p, 20p + 20) of the shards concatenated in manifest order
        assert shards == [k for k in range(4) if starts[k] < 20 * p + 20 and starts[k + 1] > 20 * p]
        cfg = TrainInputConfig(data_dir=colour_dataset, global_batch_size=8, seed=0, process_index=p,
                               process_count=2, augment=False, shuffle_buffer=64)
        spe = steps_per_epoch(cfg)
        assert spe == 5  # 40 images / 8 streams = 5 per stream, 1 row per stream and step
        it = make_train_iterator(cfg)
        batches = [next(it) for _ in range(spe)]
        rows.append(batches)
        seen.append([tuple(b["image"][:, 0, 0, 0].tolist()) + tuple(b["label"].tolist()) for b in batches])
    assert len(seen[0][0]) == 8  # 4 local images: 4 pixel values + 4 labels
    ids0, ids1 = ({t[4 + i] * 100 + round(t[i] * 1000) for t in s for i in range(4)} for s in seen)
    assert not ids0 & ids1 and len(ids0) == len(ids1) == 20  # hosts read disjoint images, half each
    one = make_train_iterator(TrainInputConfig(data_dir=colour_dataset, global_batch_size=8, seed=0, augment=False,
                                               shuffle_buffer=64))
    for step in range(5):
        batch = next(one)
        np.testing.assert_array_equal(batch["image"], np.concatenate([rows[0][step]["image"], rows[1][step]["image"]]))
        np.testing.assert_array_equal(batch["label"], np.concatenate([rows[0][step]["label"], rows[1][step]["label"]]))
    with pytest.raises(ValueError, match="num_streams"):  # 3 processes cannot split 8 streams
        host_assignment(manifest, 0, 3, 64, 8)


def test_synthetic_dataset_trains_through_pipeline_and_grid(tmp_path):
    out = str(tmp_path / "syn")
    manifest = synthetic.write_synthetic_dataset(out, 6, 4, seed=0, show_progress=False)
    assert manifest["num_images"] == 24 and manifest["num_classes"] == 6 and manifest["has_quality"]
    assert 0.0 <= manifest["quality"]["min"] <= manifest["quality"]["max"] <= 1.0
    import tensorflow_datasets as tfds
    qualities = sorted(float(e["quality"]) for e in tfds.builder_from_directory(out).as_dataset(split="train"))
    expected = sorted(synthetic.render(0, i, k)[1] for i in range(6) for k in range(4))
    np.testing.assert_allclose(qualities, expected, atol=1e-5)  # the quality feature is the rendered severity
    cfg = TrainInputConfig(data_dir=out, global_batch_size=8, seed=0)
    batch = next(make_train_iterator(cfg))
    assert set(batch["label"].tolist()) <= set(range(6))
    grid = save_augmentation_grid(out, str(tmp_path / "grid.png"), num_images=4)
    picture = cv2.imread(grid)
    assert picture.shape == (6 * 114 + 2, 4 * 114 + 2, 3)
    # first row, first tile is the decoded original: compare with the stored JPEG decoded by cv2 (BGR)
    import tensorflow as tf
    record = next(iter(tf.data.TFRecordDataset(os.path.join(out, manifest["shards"][0]["file"]))))
    image = tf.train.Example.FromString(record.numpy()).features.feature["image"].bytes_list.value[0]
    ref = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    diff = np.abs(picture[2:114, 2:114].astype(int) - ref.astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 8  # colours preserved (tf and cv2 JPEG decoders differ slightly)
    swapped = np.abs(picture[2:114, 2:114].astype(int) - ref[..., ::-1].astype(int))
    assert swapped.mean() > 10 * diff.mean()
    grid2 = save_augmentation_grid(make_train_iterator(cfg), str(tmp_path / "grid2.png"), num_images=4)
    assert cv2.imread(grid2).shape == (2 * 114 + 2, 4 * 114 + 2, 3)


@pytest.fixture
def small_dataset(tmp_path):
    """4 identities x 4 JPEGs prepared into 2 shards; the dataset folder."""
    return write_small_dataset(tmp_path)


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


def test_training_input_refuses_a_folder_without_a_manifest(tmp_path):
    from data_pipeline.input import TrainInputConfig, make_train_dataset
    src = identities(tmp_path / "src", classes=2)
    out = tmp_path / "out"
    prepare.convert_folder(src, str(out), num_workers=0, num_shards=2, show_progress=False)
    (out / "manifest.json").unlink()
    with pytest.raises(prepare.InputError, match=r"manifest\.json not found: .* is not a dataset written by"):
        make_train_dataset(TrainInputConfig(data_dir=str(out), global_batch_size=2))
    with pytest.raises(prepare.InputError, match="does not exist"):
        make_train_dataset(TrainInputConfig(data_dir=str(tmp_path / "nope"), global_batch_size=2))


def test_parallel_reads_give_the_same_batches(tmp_path):
    from data_pipeline.input import TrainInputConfig, make_train_iterator
    src = identities(tmp_path / "src", classes=4, per_class=4)
    out = str(tmp_path / "ds")
    prepare.convert_folder(src, out, num_workers=0, num_shards=3, show_progress=False)
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
