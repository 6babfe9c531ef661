"""tf.data training input: per-host shards -> interleave -> seeded per-epoch shuffle -> batch(drop_remainder) ->
parse + decode -> BGR -> augment -> normalise (all per batch) -> prefetch, yielding numpy batches.

Determinism: the file order and the shuffle of epoch e use seeds derived from (seed, e); augmentation runs
on whole batches with stateless draws from (seed, epoch, batch index in the epoch, process), a separate
draw per image. Starting at `start_step` therefore yields exactly the batch that step had in an
uninterrupted run (the skipped records are read and shuffled but not decoded: resuming late in a
5.8M-image epoch spends some seconds there).

Bad records: a record whose framing is broken (CRC mismatch, truncated shard) ends that shard's reading
for the epoch and the epoch is topped up with empty placeholder records, so every epoch still has exactly
steps_per_epoch batches. A batch whose records do not all parse and decode is rebuilt by
`make_train_iterator` from the same records with `safe_decode`: each undecodable image (and each
placeholder) is replaced by the next good image of the batch with its label, and the batch carries
'bad_records' (how many were replaced). The data order, and so an exact resume, is unchanged.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from . import augment as augment_lib
from .manifest import read_manifest, shard_paths
from .tfrecord import IMAGE_KEY, LABEL_KEY, parse_features

__all__ = ["TrainInputConfig", "make_train_dataset", "make_train_iterator", "steps_per_epoch", "read_manifest",
           "host_assignment", "decode_bgr", "save_augmentation_grid"]

_GPU_HIDDEN = False


def hide_gpus_from_tf() -> None:
    """Keeps TensorFlow off the accelerators (JAX owns them)."""
    global _GPU_HIDDEN
    if not _GPU_HIDDEN:
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # already initialised: devices can no longer change
            pass
        _GPU_HIDDEN = True


@dataclasses.dataclass
class TrainInputConfig:
    data_dir: str
    global_batch_size: int
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    augment: bool = True
    crop_prob: float = 0.2
    lowres_prob: float = 0.2
    photometric_prob: float = 0.2
    flip_prob: float = 0.5
    shuffle_buffer: int = 16384
    num_parallel_calls: int = -1  # tf.data.AUTOTUNE
    image_size: int = 112
    cycle_length: int = 16  # shards read at once
    prefetch_batches: int = 2
    threads: int | None = None  # size of a private tf.data thread pool (None: TensorFlow's default)

    @property
    def local_batch_size(self) -> int:
        if self.global_batch_size % self.process_count:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by "
                             f"process_count {self.process_count}")
        return self.global_batch_size // self.process_count


def host_assignment(manifest: dict, process_index: int, process_count: int) -> tuple[list[int], bool, int]:
    """(shard ids read by this host, whether records are split element-wise, this host's image count).

    With at least as many shards as processes each host reads whole shards (i::count); otherwise every
    host reads all shards and keeps every count-th record.
    """
    counts = [s["num_images"] for s in manifest["shards"]]
    if len(counts) >= process_count:
        ids = list(range(process_index, len(counts), process_count))
        return ids, False, sum(counts[i] for i in ids)
    total = sum(counts)
    return list(range(len(counts))), True, (total - process_index + process_count - 1) // process_count


def steps_per_epoch(cfg: TrainInputConfig, manifest: dict | None = None) -> int:
    """num_images // global_batch_size; with several hosts, capped so that every host has that many batches."""
    manifest = manifest or read_manifest(cfg.data_dir)
    steps = manifest["num_images"] // cfg.global_batch_size
    for p in range(cfg.process_count):
        steps = min(steps, host_assignment(manifest, p, cfg.process_count)[2] // cfg.local_batch_size)
    if steps <= 0:
        raise ValueError(f"{cfg.data_dir}: {manifest['num_images']} images are too few for a global batch of "
                         f"{cfg.global_batch_size} over {cfg.process_count} process(es)")
    return steps


def decode_any(encoded):
    """Encoded bytes -> uint8 (H, W, 3) in stored channel order, decoded as the original does.

    The original decodes with OpenCV (libjpeg's accurate integer IDCT); tf.io.decode_image uses the fast
    IDCT for JPEG, which is off by about one grey level on average and up to 5. JPEG therefore goes through
    decode_jpeg(dct_method='INTEGER_ACCURATE') (bit-exact with cv2.imdecode), PNG/BMP/GIF through
    decode_image. This is also the check `adaface-jax prepare` and `adaface-jax check` apply to every image.
    """
    return tf.cond(tf.io.is_jpeg(encoded),
                   lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
                   lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))


def decode_bgr(encoded, channel_order: str, image_size: int):
    """Encoded bytes -> uint8 BGR (image_size, image_size, 3); other sizes are resized (bilinear)."""
    image = decode_any(encoded)
    if channel_order.upper() == "RGB":
        image = tf.reverse(image, axis=[-1])
    shape = tf.shape(image)
    image = tf.cond(tf.logical_and(shape[0] == image_size, shape[1] == image_size), lambda: image,
                    lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, [image_size, image_size])),
                                                     0, 255), tf.uint8))
    image.set_shape([image_size, image_size, 3])
    return image


def normalize(image_uint8):
    """uint8 -> float32 (x/255 - 0.5)/0.5, computed as x/127.5 - 1: the same float32 bits (scaling by 2 is exact
    and commutes with rounding) with one pass fewer over the batch."""
    return tf.cast(image_uint8, tf.float32) / 127.5 - 1.0


def _safe_decode_batch(records, spec, image_size: int):
    """(images uint8 (B, S, S, 3), labels int64 (B,), number of bad records) for a batch of serialized
    examples, where a record that does not parse or decode is replaced by the next good one (cyclically)."""
    n = tf.shape(records)[0]

    def one(i, record):
        example = tf.io.parse_single_example(record, spec)
        return i, decode_bgr(example[IMAGE_KEY], "BGR", image_size), example[LABEL_KEY]

    good = tf.data.Dataset.from_tensor_slices((tf.range(n), records)).map(one).ignore_errors()
    none = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int32), tf.zeros([0, image_size, image_size, 3], tf.uint8),
                                         tf.zeros([0], tf.int64)))
    idx, images, labels = good.batch(2 ** 30).concatenate(none).take(1).get_single_element()
    num_good = tf.shape(idx)[0]
    # position i takes the first good record at or after i (wrapping round); with no good record at all the
    # batch stays black with label 0 (every record counted bad)
    src = tf.searchsorted(idx, tf.range(n), side="left") % tf.maximum(num_good, 1)
    images = tf.cond(num_good > 0, lambda: tf.gather(images, src),
                     lambda: tf.zeros([n, image_size, image_size, 3], tf.uint8))
    labels = tf.cond(num_good > 0, lambda: tf.gather(labels, src), lambda: tf.zeros([n], tf.int64))
    return images, labels, n - num_good


def make_train_dataset(cfg: TrainInputConfig, start_step: int = 0, safe_decode: bool = False) -> tf.data.Dataset:
    """Infinite dataset of {'image': float32 (B_local, S, S, 3) BGR normalised, 'label': int32 (B_local,)}.

    safe_decode: undecodable records are replaced (see the module doc) and batches carry 'bad_records'
    (int32); slower than the normal path, which `make_train_iterator` uses only to rebuild a failed batch."""
    hide_gpus_from_tf()
    manifest = read_manifest(cfg.data_dir)
    files = shard_paths(cfg.data_dir, manifest)
    shard_ids, element_split, _ = host_assignment(manifest, cfg.process_index, cfg.process_count)
    files = [files[i] for i in shard_ids]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"{cfg.data_dir}: shard files listed in manifest.json are missing: {missing[:3]}")
    b_local = cfg.local_batch_size
    spe = steps_per_epoch(cfg, manifest)
    per_epoch = spe * b_local
    start_epoch, step_in_epoch = divmod(int(start_step), spe)
    channel_order = manifest["channel_order"]
    seed = int(cfg.seed)
    cycle = max(1, min(cfg.cycle_length, len(files)))
    spec = parse_features()
    files_t = tf.constant(files)

    def epoch_records(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(len(files)), seed=tf.stack([seed, epoch]))
        ds = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, order))
        # a broken record (CRC mismatch, truncation) ends that shard for this epoch instead of the run
        ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20).ignore_errors(log_warning=True),
                           cycle_length=cycle, block_length=1, num_parallel_calls=cycle, deterministic=True)
        if element_split:
            ds = ds.shard(cfg.process_count, cfg.process_index)
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed * 1_000_003 + epoch, reshuffle_each_iteration=False)
        # top up with empty (bad) records if a broken shard fell short: every epoch has exactly per_epoch records
        ds = ds.take(per_epoch).concatenate(tf.data.Dataset.from_tensors(tf.constant(b"")).repeat())
        ds = ds.take(per_epoch).enumerate()
        return ds.map(lambda pos, record: (epoch, pos, record))

    def finish(epoch, pos, record):
        # Records are parsed and decoded per batch: a map_fn inside one tf.data call costs about half of what
        # one tf.data element per image costs, for the same decoded pixels.
        # decoded in stored order; the swap to BGR happens once per batch below
        if safe_decode:
            images, labels, bad = _safe_decode_batch(record, spec, cfg.image_size)
        else:
            example = tf.io.parse_example(record, spec)
            labels = example[LABEL_KEY]
            images = tf.map_fn(lambda encoded: decode_bgr(encoded, "BGR", cfg.image_size), example[IMAGE_KEY],
                               fn_output_signature=tf.TensorSpec([cfg.image_size, cfg.image_size, 3], tf.uint8))
        if channel_order.upper() == "RGB":
            images = tf.reverse(images, axis=[-1])  # BGR before augmenting: the photometric luma depends on it
        if cfg.augment:  # batched ops; the draws depend only on (seed, epoch, batch index in epoch, process)
            batch_index = pos[0] // b_local
            batch_seed = tf.stack([tf.constant(seed, tf.int64) * 7919 + epoch[0],
                                   batch_index * cfg.process_count + cfg.process_index])
            images = augment_lib.augment_batch(images, batch_seed, cfg.image_size, crop_prob=cfg.crop_prob,
                                               lowres_prob=cfg.lowres_prob, photometric_prob=cfg.photometric_prob,
                                               flip_prob=cfg.flip_prob)
        out = {"image": normalize(images), "label": tf.cast(labels, tf.int32)}
        if safe_decode:
            out["bad_records"] = tf.cast(bad, tf.int32)
        return out

    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
    ds = ds.skip(step_in_epoch * b_local)  # the stream starts at epoch start_epoch, so this skips within it
    ds = ds.batch(b_local, drop_remainder=True)
    ds = ds.map(finish, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    ds = ds.prefetch(cfg.prefetch_batches)
    options = tf.data.Options()
    options.deterministic = True
    if cfg.threads:
        options.threading.private_threadpool_size = cfg.threads
    return ds.with_options(options)


def make_train_iterator(cfg: TrainInputConfig, start_step: int = 0):
    """Infinite iterator of numpy batches (see make_train_dataset), each with 'bad_records' (int): a batch
    that fails to parse or decode is rebuilt from the same records with the bad ones replaced."""
    batches = make_train_dataset(cfg, start_step).as_numpy_iterator()
    step = int(start_step)
    while True:
        try:
            batch = next(batches)  # a failed element does not end a tf.data iterator: the next one follows
            batch["bad_records"] = 0
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
            batch = next(make_train_dataset(cfg, step, safe_decode=True).take(1).as_numpy_iterator())
            batch["bad_records"] = int(batch["bad_records"])
        yield batch
        step += 1


# ----------------------------------------------------------------------------------------------- preview

def _to_uint8_bgr(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:  # normalised float BGR
        images = np.clip(np.round((images * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8)
    return images


def _tile(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    return canvas


def save_augmentation_grid(source, path_png: str, num_images: int = 8, seed: int = 0) -> str:
    """Writes a PNG grid of training samples in correct colours (BGR data -> RGB display).

    source: a dataset directory (rows: original, crop, low-res, photometric, flip, full recipe; each op at
    probability 1 to show it), or a batch dict / iterator of batches from make_train_iterator (tiled as is;
    note that this takes one batch from the iterator).
    """
    import cv2  # noqa: PLC0415

    if isinstance(source, (str, os.PathLike)):
        hide_gpus_from_tf()
        manifest = read_manifest(source)
        raw = tf.data.TFRecordDataset(shard_paths(source, manifest)[:1]).take(num_images)
        spec, size = parse_features(), 112
        originals = [decode_bgr(tf.io.parse_single_example(r, spec)[IMAGE_KEY], manifest["channel_order"], size)
                     for r in raw]
        off = dict(crop_prob=0.0, lowres_prob=0.0, photometric_prob=0.0, flip_prob=0.0)
        variants = [dict(off, crop_prob=1.0), dict(off, lowres_prob=1.0), dict(off, photometric_prob=1.0),
                    dict(off, flip_prob=1.0), {}]
        rows = [[im.numpy() for im in originals]]
        for v, probs in enumerate(variants):
            rows.append([augment_lib.augment(im, tf.constant([seed, 100 * v + k], tf.int64), size, **probs).numpy()
                         for k, im in enumerate(originals)])
    else:
        batch = source if isinstance(source, dict) else next(iter(source))
        images = _to_uint8_bgr(batch["image"])[:num_images * 4]
        rows = [list(images[i:i + num_images]) for i in range(0, len(images), num_images)]
    grid_bgr = _tile(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
    # cv2.imwrite takes BGR and stores standard RGB PNG, so the saved picture shows true colours.
    tmp = f"{path_png}.tmp{os.getpid()}.png"
    if not cv2.imwrite(tmp, grid_bgr):
        raise OSError(f"could not write {path_png}")
    os.replace(tmp, path_png)
    return path_png
