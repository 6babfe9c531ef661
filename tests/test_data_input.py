"""Training input pipeline: batch contract, BGR order, determinism and resume, multi-host split, preview grid."""
import os

import cv2
import numpy as np
import pytest

from data_pipeline import convert, synthetic
from data_pipeline.input import (TrainInputConfig, host_assignment, make_train_iterator, read_manifest,
                                 save_augmentation_grid, steps_per_epoch)

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
    convert.convert_folder(str(root / "src"), out, num_workers=0, num_shards=4, show_progress=False)
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


def test_normalize_is_exactly_the_reference_formula():
    import tensorflow as tf

    from data_pipeline.input import normalize
    values = np.arange(256, dtype=np.uint8)
    ref = (values.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    ours = normalize(tf.constant(values)).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.int32), ref.view(np.int32))  # bit for bit, signs included
