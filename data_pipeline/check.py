"""Pre-flight check of a prepared dataset (`adaface-jax check DATA_DIR`).

Reads every record of every shard listed in manifest.json and checks what training relies on: the shard
files exist with the recorded size and sha256, every record's TFRecord framing and CRC are intact, it
parses as our Example ('image', 'label'), its image decodes completely with the TRAINING decoder
(data_pipeline.input.decode_any: TensorFlow, JPEG with the accurate integer IDCT), 0 <= label <
num_classes, and the per-shard, total and per-class counts equal the manifest's. Every bad record is named
by shard file and record index (its position in the shard, from 0).

DATA_DIR is a local folder or a gs:// URL. A folder without manifest.json is refused naming what is missing
(and, for an interrupted conversion, that it is unfinished): the manifest is written last, so a dataset
without one is not finished. A gs:// shard is downloaded once to a local temporary file, whose checksum
and records are then checked (one transfer per shard instead of two).
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import time

import tensorflow as tf
from tqdm import tqdm

from adaface_jax import io
from data_pipeline.prepare import tf_error_text, training_decode_error
from data_pipeline.input import hide_gpus_from_tf

from .manifest import read_manifest
from .tfrecord import IMAGE_KEY, LABEL_KEY, file_sha256

CHUNK = 512  # records handed to the decoding threads at a time


def _check_record(raw: bytes, num_classes: int) -> tuple[int | None, str | None]:
    """(label or None, None if the record is good else why not)."""


    try:
        feature = tf.train.Example.FromString(raw).features.feature
    except Exception as err:  # noqa: BLE001  (protobuf DecodeError and friends)
        return None, f"not a tf.train.Example ({type(err).__name__})"
    if IMAGE_KEY not in feature or len(feature[IMAGE_KEY].bytes_list.value) != 1:
        return None, f"no single '{IMAGE_KEY}' bytes feature"
    if LABEL_KEY not in feature or len(feature[LABEL_KEY].int64_list.value) != 1:
        return None, f"no single '{LABEL_KEY}' int64 feature"
    label = int(feature[LABEL_KEY].int64_list.value[0])
    if not 0 <= label < num_classes:
        return None, f"label {label} outside [0, {num_classes})"
    reason = training_decode_error(feature[IMAGE_KEY].bytes_list.value[0])
    if reason is not None:
        return label, f"image {reason}"
    return label, None


def check_dataset(data_dir: str, *, show_progress: bool = True, threads: int | None = None,
                  checksums: bool = True) -> dict:
    """Checks a dataset; returns a report: {'data_dir', 'num_records', 'num_images' (manifest), 'bad_records':
    [{'file', 'record', 'reason'}], 'problems': [one line each, bad records included], 'seconds',
    'images_per_sec', 'ok'}. Raises InputError only when there is no readable manifest."""


    hide_gpus_from_tf()
    data_dir = io.check_path(data_dir, "dataset folder")
    manifest = read_manifest(data_dir)
    num_classes = int(manifest["num_classes"])
    problems, bad = [], []
    class_counts: collections.Counter = collections.Counter()
    total = 0
    start = time.time()
    bar = tqdm(total=int(manifest["num_images"]), desc=f"check {io.basename(data_dir)}", unit="img",
               dynamic_ncols=True, smoothing=0.1, disable=None if show_progress else True)
    threads = threads or min(8, os.cpu_count() or 1)

    def check_shard(local, fname, shard, flush, bad_record) -> int:
        """Checks one shard file (a local file); returns its number of readable records."""
        size = io.getsize(local)
        if "num_bytes" in shard and size != shard["num_bytes"]:
            problems.append(f"{fname}: {size} bytes, manifest says {shard['num_bytes']}")
        if checksums and "sha256" in shard and file_sha256(local) != shard["sha256"]:
            problems.append(f"{fname}: sha256 differs from the manifest (the file changed after it was written)")
        count, chunk = 0, []
        records = iter(tf.data.TFRecordDataset(local, buffer_size=1 << 20))
        while True:
            try:
                raw = next(records).numpy()
            except StopIteration:
                break
            except tf.errors.OpError as err:  # CRC mismatch, truncation: the rest of the shard is unreadable
                text = tf_error_text(err)
                bad_record(fname, count, f"unreadable TFRecord framing ({text}); the shard cannot be read "
                                         "past this record")
                break
            chunk.append((count, raw))
            count += 1
            if len(chunk) >= CHUNK:
                flush(fname, chunk)
        flush(fname, chunk)
        if count != shard["num_images"]:
            problems.append(f"{fname}: {count} readable records, manifest says {shard['num_images']}")
        return count

    def bad_record(fname, index, reason):
        bad.append({"file": fname, "record": index, "reason": reason})
        problems.append(f"{fname} record {index}: {reason}")

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        def flush(fname, chunk):
            results = pool.map(lambda item: _check_record(item[1], num_classes), chunk)
            for (index, _), (label, reason) in zip(chunk, results):
                if label is not None and reason is None:
                    class_counts[label] += 1
                if reason is not None:
                    bad_record(fname, index, reason)
            bar.update(len(chunk))
            chunk.clear()

        for shard in manifest["shards"]:
            fname = shard["file"]
            path = io.join(data_dir, fname)
            if not io.isfile(path):
                problems.append(f"{fname}: shard file missing ({shard['num_images']} records unchecked)")
                continue
            with io.local_copy(path) as local:
                total += check_shard(local, fname, shard, flush, bad_record)
    bar.close()
    if total != manifest["num_images"] and not problems:
        problems.append(f"{total} records in the shards, manifest says num_images={manifest['num_images']}")
    expected_counts = manifest.get("class_counts")
    if expected_counts is not None and not bad and not problems:
        got = [class_counts.get(i, 0) for i in range(num_classes)]
        diff = [i for i in range(num_classes) if got[i] != expected_counts[i]] if len(expected_counts) == num_classes \
            else list(range(num_classes))
        if diff:
            i = diff[0]
            problems.append(f"per-class counts differ from the manifest for {len(diff)} class(es), e.g. class {i}: "
                            f"{got[i]} records, manifest says "
                            f"{expected_counts[i] if i < len(expected_counts) else 'nothing'}")
    elapsed = time.time() - start
    return {"data_dir": data_dir, "num_records": total, "num_images": int(manifest["num_images"]),
            "num_shards": len(manifest["shards"]), "num_classes": num_classes, "bad_records": bad,
            "problems": problems, "ok": not problems, "seconds": round(elapsed, 3),
            "images_per_sec": round(total / max(elapsed, 1e-9), 1)}


def summary_line(report: dict, max_named: int = 20) -> str:
    """One line: OK with counts, or the number of problems naming (up to max_named of) them."""
    if report["ok"]:
        return (f"{report['data_dir']}: OK, {report['num_records']} records in {report['num_shards']} shard(s) decode "
                f"with the training decoder, labels in [0, {report['num_classes']}), counts and checksums match "
                f"the manifest ({report['images_per_sec']:.0f} images/s)")
    named = "; ".join(report["problems"][:max_named])
    more = len(report["problems"]) - max_named
    return (f"{report['data_dir']}: {len(report['problems'])} problem(s), {len(report['bad_records'])} bad "
            f"record(s): {named}" + (f"; ... and {more} more (listed above)" if more > 0 else ""))
