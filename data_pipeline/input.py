"""tf.data training input: logical streams -> per-stream shard pieces -> interleave -> seeded per-epoch shuffle
-> rows of the global batch -> batch -> decode -> augment, yielding this process's numpy rows.

The layout is ``data_pipeline.streams``'s (topology-independent: S logical streams of contiguous record ranges,
each supplying R = B/S rows of every global batch, process p running a contiguous block of them, so its rows are
its contiguous block of the global batch). Augmentation draws are keyed per image by (seed, epoch, global
position in the epoch). So the global batches -- records, order and augmentation -- are the same for any number
of processes and devices, each process reads, decodes and augments only its own rows, and a run can resume on
another topology at the exact next batch.

A process reads only the records of its streams: a stream that starts inside a shard seeks to its first record
(byte offsets found once per run from the records' length fields), so the bytes read per epoch are the
process's share plus read-buffer overshoot (``streams.io_amplification`` computes the figure).

Starting at `start_step` yields exactly the batch that step had in an uninterrupted run (the skipped records
of the epoch are read and shuffled but not decoded: resuming late in a 5.8M-image epoch spends some seconds).

Datasets on gs://: the manifest is read through ``adaface_jax.io`` and tf.data reads the TFRecords straight
from the bucket. A bucket answers each read after tens of milliseconds, so for a remote dataset the pieces of a
stream and the streams themselves are read in parallel (``TrainInputConfig.parallel_reads``, default
tf.data.AUTOTUNE for gs:// and sequential for a local disk) with ``deterministic=True``: the same records in
the same order as a sequential read, so the batches (and an exact resume) do not depend on where the data lives.

Bad records: a record whose framing is broken (CRC mismatch, truncated shard) ends that shard's reading
for the epoch and the stream is topped up with empty placeholder records, so every epoch still has exactly
steps_per_epoch batches. A batch whose records do not all parse and decode is rebuilt by
`make_train_iterator` from the same records with `safe_decode`: each undecodable image (and each
placeholder) is replaced by the next good image of the batch with its label, and the batch carries
'bad_records' (how many were replaced). The data order, and so an exact resume, is unchanged.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import tensorflow as tf
from tensorflow.python.ops import gen_dataset_ops

from adaface_jax import io

from . import augment as augment_lib
from .manifest import read_manifest, shard_paths
from .pixels import normalize_pixels_tf
# the layout, re-exported: callers that build the pipeline import it from here too
from .streams import (TrainInputConfig, _piece_buffer, effective_streams, host_assignment, io_amplification,
                      process_streams, steps_per_epoch, stream_layout)
from .tfrecord import IMAGE_KEY, LABEL_KEY, parse_features

__all__ = ["TrainInputConfig", "make_train_dataset", "make_train_iterator", "steps_per_epoch", "read_manifest",
           "host_assignment", "stream_layout", "io_amplification", "decode_bgr", "save_augmentation_grid"]

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


class _TFRecordsFromOffset(tf.data.Dataset):
    """The records of one TFRecord file from a byte offset on (TensorFlow's TFRecordDatasetV2 kernel, which
    takes the offset that the public TFRecordDataset does not expose): a stream that starts inside a shard
    seeks to its first record instead of reading the records before it every epoch."""

    def __init__(self, path, byte_offset, buffer_size):
        self._path, self._offset, self._buffer = path, byte_offset, buffer_size
        variant = gen_dataset_ops.tf_record_dataset_v2(
            filenames=path, compression_type="", buffer_size=tf.cast(buffer_size, tf.int64),
            byte_offsets=tf.cast(byte_offset, tf.int64))
        super().__init__(variant)

    def _inputs(self):
        return []

    @property
    def element_spec(self):
        return tf.TensorSpec([], tf.string)


def record_offsets(path: str, indices) -> dict[int, int]:
    """{record index: byte offset} in a TFRecord file, from the records' length fields (8-byte little-endian
    length + 4-byte CRC + data + 4-byte CRC; only the headers are read). An index past the end of the file (or
    past a broken length field) maps to the file size, so its piece reads nothing and is topped up like a
    truncated shard."""
    wanted = sorted({int(i) for i in indices})
    out: dict[int, int] = {}
    with io.open(path, "rb") as f:
        size = f.seek(0, 2) if not hasattr(f, "size") else f.size()
        offset, index = 0, 0
        for target in wanted:
            while index < target and offset < size:
                f.seek(offset)
                head = f.read(8)
                if len(head) < 8:
                    offset = size
                    break
                offset += 16 + int.from_bytes(head, "little")
                index += 1
            out[target] = min(offset, size) if index == target else size
    return out


def _piece_offsets(files: list[str], layout, streams) -> dict[tuple[int, int], int]:
    """{(shard id, first record): byte offset} for the pieces of `streams` (one scan per shard)."""
    starts: dict[int, set[int]] = {}
    for s in streams:
        for k, skip, _ in layout[s]:
            starts.setdefault(k, set()).add(skip)
    out = {}
    for k, skips in starts.items():
        found = record_offsets(files[k], [i for i in skips if i > 0]) if any(skips) else {}
        for i in skips:
            out[(k, i)] = found.get(i, 0)
    return out


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
    """Infinite dataset of {'image': float32 (B_local, S, S, 3) BGR normalised, 'label': int32 (B_local,)}: this
    process's contiguous block of rows of each global batch (see the module doc).

    safe_decode: undecodable records are replaced (see the module doc) and batches carry 'bad_records'
    (int32); slower than the normal path, which `make_train_iterator` uses only to rebuild a failed batch."""
    hide_gpus_from_tf()
    data_dir = io.check_path(cfg.data_dir, "dataset folder")
    manifest = read_manifest(data_dir)
    num_streams = effective_streams(cfg.num_streams, cfg.global_batch_size)
    local = process_streams(num_streams, cfg.process_index, cfg.process_count)
    layout = stream_layout(manifest, num_streams)
    all_files = shard_paths(data_dir, manifest)
    read = sorted({k for s in local for k, _, _ in layout[s]})
    missing = [all_files[k] for k in read if not io.exists(all_files[k])]
    if missing:
        raise FileNotFoundError(f"{data_dir}: shard files listed in manifest.json are missing: {missing[:3]}")
    b_local = cfg.local_batch_size
    rows = cfg.global_batch_size // num_streams  # rows each stream supplies per step
    spe = steps_per_epoch(cfg, manifest)
    reads = cfg.parallel_reads if cfg.parallel_reads is not None else \
        (tf.data.AUTOTUNE if io.is_remote(data_dir) else 0)

    def parallel(cycle: int) -> dict:
        """interleave() arguments: sequential, or `reads` in flight (at most the cycle), in sequential order."""
        if not reads:
            return {}
        return {"num_parallel_calls": reads if reads == tf.data.AUTOTUNE else min(int(reads), cycle),
                "deterministic": True}
    per_stream_epoch = spe * rows
    start_epoch, step_in_epoch = divmod(int(start_step), spe)
    channel_order = manifest["channel_order"]
    seed = int(cfg.seed)
    buffer = max(2 * rows, cfg.shuffle_buffer // num_streams)  # depends on the stream count only, never on P
    spec = parse_features()
    # the local streams' pieces as padded tables, so one tf.data function builds any stream
    width = max(1, max(len(layout[s]) for s in local))
    files = [[all_files[k] for k, _, _ in layout[s]] + [""] * (width - len(layout[s])) for s in local]
    offsets = _piece_offsets(all_files, layout, local)
    record_bytes = [float(sh.get("num_bytes") or 0) / max(1, int(sh["num_images"])) for sh in manifest["shards"]]
    skips = [[offsets[(k, n)] for k, n, _ in layout[s]] + [0] * (width - len(layout[s])) for s in local]
    takes = [[t for _, _, t in layout[s]] + [0] * (width - len(layout[s])) for s in local]
    buffers = [[_piece_buffer(record_bytes[k] * t) for k, _, t in layout[s]] + [0] * (width - len(layout[s]))
               for s in local]
    files_t, skips_t, takes_t = tf.constant(files), tf.constant(skips, tf.int64), tf.constant(takes, tf.int64)
    buffers_t = tf.constant(buffers, tf.int64)
    counts_t = tf.constant([len(layout[s]) for s in local], tf.int32)

    def read_piece(path, offset, take, buffer_size):
        # a broken record (CRC mismatch, truncation) ends that piece for this epoch instead of the run
        return _TFRecordsFromOffset(path, offset, buffer_size).take(take).ignore_errors(log_warning=True)

    def stream_epoch(i, epoch):
        """Stream local[i] in one epoch: exactly per_stream_epoch serialized records."""
        stream = tf.cast(i, tf.int64) + local.start
        key = tf.random.experimental.stateless_fold_in(tf.stack([tf.constant(seed, tf.int64), epoch]), stream)
        order = tf.random.experimental.stateless_shuffle(tf.range(counts_t[i]), seed=key)
        pieces = tf.data.Dataset.from_tensor_slices((tf.gather(files_t[i], order), tf.gather(skips_t[i], order),
                                                     tf.gather(takes_t[i], order), tf.gather(buffers_t[i], order)))
        # parallel (remote data): up to cycle_length pieces of the stream are read at once, in the same order
        ds = pieces.interleave(read_piece, cycle_length=max(1, cfg.cycle_length), block_length=1,
                               **parallel(max(1, cfg.cycle_length)))
        ds = ds.shuffle(buffer, seed=(seed * 1_000_003 + epoch) * 1_009 + stream, reshuffle_each_iteration=False)
        # top up with empty (bad) records if a broken shard fell short: every epoch has exactly per_stream_epoch
        return ds.concatenate(tf.data.Dataset.from_tensors(tf.constant(b"")).repeat()).take(per_stream_epoch)

    def stream(i):
        ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(lambda e: stream_epoch(i, e))
        ds = ds.skip(step_in_epoch * rows)  # the stream starts at epoch start_epoch, so this skips within it
        return ds.batch(rows, drop_remainder=True)  # its R rows of each step

    first_row = local.start * rows  # this process's rows are [first_row, first_row + b_local) of each global batch

    def finish(step, record):
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
        if cfg.augment:  # batched ops; each image's draws depend only on (seed, epoch, global position)
            params = augment_lib.rows_params(seed, step // spe, step % spe, cfg.global_batch_size, first_row, b_local,
                                             cfg.image_size,
                                             crop_prob=cfg.crop_prob, lowres_prob=cfg.lowres_prob,
                                             photometric_prob=cfg.photometric_prob, flip_prob=cfg.flip_prob)
            images = augment_lib.apply_params_batch(images, params)
        out = {"image": normalize_pixels_tf(images), "label": tf.cast(labels, tf.int32)}
        if safe_decode:
            out["bad_records"] = tf.cast(bad, tf.int32)
        return out

    # rows R of local stream 0, R of local stream 1, ...: this process's block of the global batch, in order.
    # (Local data: a sequential interleave; reading costs little next to decoding, and a parallel one costs more
    # CPU per row. Remote data: the streams read in parallel, deterministic, so reads overlap one another.)
    ds = tf.data.Dataset.range(len(local)).interleave(stream, cycle_length=len(local), **parallel(len(local)))
    ds = ds.batch(len(local), drop_remainder=True).map(lambda records: tf.reshape(records, [b_local]))
    ds = ds.enumerate(start=int(start_step))  # the global step of each batch
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
    if isinstance(source, (str, os.PathLike)):
        hide_gpus_from_tf()
        source = io.check_path(source, "dataset folder")
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
    path_png = io.check_path(path_png, "sample grid")
    io.makedirs(io.dirname(path_png))
    # cv2.imwrite takes BGR and stores standard RGB PNG, so the saved picture shows true colours.
    ok, png = cv2.imencode(".png", grid_bgr)
    if not ok:
        raise OSError(f"could not encode {path_png}")
    return io.write_bytes(path_png, png.tobytes())
