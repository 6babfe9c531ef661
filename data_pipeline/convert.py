"""Converters to sharded TFRecords (+ manifest.json + tfds metadata): from .rec, an image folder, a list file.

Work is planned up front (which source items go to which shard), shards are written in parallel worker
processes, each through a temporary name and a rename, and a finished shard leaves a small progress record
(plan hash + sha256). Rerunning an interrupted conversion verifies those shards and writes only the rest.
Image bytes are copied as stored (no re-encode); only formats TensorFlow cannot decode (e.g. PGM) are
re-encoded losslessly to PNG, and the manifest counts them.

Every image is decoded once, completely, with the training decoder (data_pipeline.input.decode_any,
TensorFlow) in the worker that writes it: TensorFlow and OpenCV disagree on damaged files (a truncated
JPEG decodes in OpenCV with a grey bottom but fails in TensorFlow), and a file TensorFlow cannot decode
would otherwise stop training mid-epoch. Such an image stops the conversion naming it, or with
skip_corrupt is left out and listed in the manifest.

A folder that holds a finished dataset (manifest.json) or an unfinished conversion is only written to
again for the same source (kind, path and content plan); anything else needs force=True.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import time
from typing import Callable

import cv2
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from adaface_jax.errors import InputError
from adaface_jax.io import temp_pattern, write_json
from data_pipeline.input import decode_any, hide_gpus_from_tf

from . import manifest as manifest_lib
from . import recordio
from .tfrecord import file_sha256, make_example, shard_filename, write_tfrecord_atomic

DEFAULT_SHARD_BYTES = 150 * 1024 * 1024
PROGRESS_DIR = ".progress"
SOURCE_FILE = "source.json"  # in PROGRESS_DIR: the source an unfinished conversion is writing
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp", ".gif")


@dataclasses.dataclass
class SourcePlan:
    """What to convert: `items` (one tuple per image, meaning depends on the source) and their byte sizes.

    `producer(task, stats)` turns a shard's items into records (see `_examples`); it is a module-level
    function, so a task that carries it pickles into a spawned worker and the converter needs to know
    nothing about the source (the synthetic renderer brings its own)."""
    kind: str  # "rec" | "files" | "synthetic": recorded, and part of the plan hash
    producer: Callable
    items: list
    sizes: np.ndarray
    source: dict  # recorded in the manifest
    params: dict = dataclasses.field(default_factory=dict)  # passed to the worker
    class_names: list | None = None  # None: str(label) for label in range(max label + 1)
    channel_order: str = "RGB"


# ----------------------------------------------------------------------------------------------- sources

def sniff_image_format(data: bytes) -> str | None:
    """'jpeg' | 'png' | 'bmp' | 'gif' (what tf.io.decode_image reads) or None."""
    head = bytes(data[:8])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"GIF8"):
        return "gif"
    return None


def read_property(path: str) -> tuple[int, int, int]:
    """InsightFace `property` file: "num_classes,height,width" -> ints; raises naming the file."""
    with open(path) as f:
        text = f.read().strip()
    try:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != 3 or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise InputError(f"{path}: expected 'num_classes,height,width' (three positive integers), got {text[:80]!r}") \
            from None
    return values


def resolve_rec(src: str, idx_path: str | None = None) -> tuple[str, str | None, str | None]:
    """(rec, idx or None, property or None) for a .rec file or an InsightFace dataset folder
    (faces_emore/ holding train.rec, train.idx and property)."""
    src = os.path.abspath(src)
    if os.path.isdir(src):
        rec = os.path.join(src, "train.rec")
        if not os.path.isfile(rec):
            recs = sorted(glob.glob(os.path.join(src, "*.rec")))
            if len(recs) != 1:
                raise InputError(f"{src}: expected an InsightFace dataset folder holding train.rec (+ train.idx, "
                                 f"property); found {len(recs)} .rec files {[os.path.basename(r) for r in recs][:5]}")
            rec = recs[0]
    elif os.path.exists(src):
        rec = src
    else:
        raise FileNotFoundError(2, "No such file or directory", src)
    if idx_path is None:
        guess = os.path.splitext(rec)[0] + ".idx"
        idx_path = guess if os.path.exists(guess) else None
    prop = os.path.join(os.path.dirname(rec), "property")
    return rec, idx_path, prop if os.path.isfile(prop) else None


def plan_rec(rec_path: str, idx_path: str | None = None, skip_corrupt: bool = False) -> SourcePlan:
    """Images of an InsightFace .rec (record 0 is a header naming the image keys); sizes from offsets. Without .idx the file is scanned.

    rec_path may be the dataset folder. A truncated file (records the .idx places at or past the end, or a
    last record cut short) raises naming the record and byte offset; with skip_corrupt those records are
    left out and listed. The `property` file next to the .rec ("num_classes,112,112") is cross-checked
    against the header record and sets the class count."""
    rec_path, idx_path, prop_path = resolve_rec(rec_path, idx_path)
    prop = read_property(prop_path) if prop_path else None
    with recordio.RecordIOReader(rec_path, idx_path, skip_corrupt=skip_corrupt) as reader:
        scan_corrupt = [{"index": i, "offset": o, "reason": r} for i, o, r in reader.corrupt]
        size = reader.file_size
        past = sorted((o, k) for k, o in reader.offsets.items() if o >= size)
        if past:
            o, k = past[0]
            msg = (f"{rec_path} is truncated or does not match {idx_path}: record {k} at byte offset {o} starts at "
                   f"or past the end of the file ({size} bytes); {len(past)} of {len(reader.offsets)} indexed "
                   "records are beyond the end")
            if not skip_corrupt:
                raise InputError(msg + " (pass --skip-corrupt to convert the readable ones)")
            scan_corrupt += [{"index": k, "offset": o, "reason": f"past the end of the file ({size} bytes)"}
                             for o, k in past]
            for _, k in past:
                del reader.offsets[k]
        keys = reader.image_keys()
        header_classes = None
        if 0 in reader.offsets:
            header, _ = reader.read_image_record(0)
            if header.flag >= 2:
                header_classes = int(header.label[1]) - int(header.label[0])
        if keys:  # the record nearest the end is where a cut-short file shows: check it now, not mid-run
            last = max(keys, key=lambda k: reader.offsets[k])
            try:
                reader.read_image_record(last)
            except recordio.CorruptRecordError as err:
                if not skip_corrupt:
                    raise InputError(f"{rec_path} is truncated: {err} (pass --skip-corrupt to convert the "
                                     "readable records)") from None
                scan_corrupt.append({"index": last, "offset": reader.offsets[last], "reason": err.reason})
                keys = [k for k in keys if k != last]
        offsets = np.array([reader.offsets[k] for k in keys], np.int64)
        all_offsets = np.array(sorted(reader.offsets.values()) + [size], np.int64)
        nxt = all_offsets[np.searchsorted(all_offsets, offsets, side="right")]
        idx_used = reader.idx_path
    num_classes = header_classes
    if prop is not None:
        if header_classes is not None and header_classes > 0 and header_classes != prop[0]:
            raise InputError(f"{prop_path} says {prop[0]} classes but the header record of {rec_path} says "
                             f"{header_classes}")
        num_classes = prop[0]
    if not keys:
        raise InputError(f"{rec_path}: no readable image records")
    source = {"kind": "rec", "path": rec_path, "idx": idx_used and os.path.abspath(idx_used), "bytes": size,
              "scan_skipped_corrupt": scan_corrupt}
    if prop is not None:
        source["property"] = {"path": prop_path, "num_classes": prop[0], "image_size": list(prop[1:])}
    plan = SourcePlan("rec", _records_rec, [(int(k), int(o)) for k, o in zip(keys, offsets)], nxt - offsets, source,
                      {"rec_path": rec_path, "skip_corrupt": skip_corrupt})
    if num_classes:
        plan.params["num_classes"] = num_classes
        plan.class_names = [str(i) for i in range(num_classes)]
    return plan


def plan_folder(root: str) -> SourcePlan:
    """One subfolder per identity; labels follow the lexicographic sort of folder names (like ImageFolder)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise InputError(f"image folder {root} " + ("is not a folder" if os.path.exists(root) else "does not exist"))
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not class_names:
        raise InputError(f"{root}: no identity subfolders found (expected {root}/<identity>/<image>)")
    items = []
    for label, name in enumerate(class_names):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            for fname in sorted(files):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.join(dirpath, fname), label, len(items)))
    if not items:
        raise InputError(f"{root}: no images with extensions {IMAGE_EXTENSIONS} in its {len(class_names)} "
                         "identity subfolders")
    sizes = np.array([os.path.getsize(p) for p, _, _ in items], np.int64)
    return SourcePlan("files", _records_files, items, sizes, {"kind": "folder", "path": root},
                      class_names=class_names)


def plan_list(list_path: str, root: str | None = None) -> SourcePlan:
    """A list file of `path<TAB>label` lines (paths relative to `root`, default: the list's folder)."""
    root = os.path.abspath(root or os.path.dirname(os.path.abspath(list_path)))
    if os.path.isdir(list_path):
        raise InputError(f"{list_path}: is a folder; expected a list file of 'path<TAB>label' lines "
                         "(use `prepare folder` for a folder of identity subfolders)")
    items = []
    with open(list_path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                parts = line.rsplit(None, 1)
            try:
                path, label = parts[0], int(parts[1])
            except (IndexError, ValueError):
                raise InputError(f"{list_path}:{line_no}: expected 'path<TAB>integer label', got "
                                 f"{line.rstrip()[:200]!r}") from None
            if label < 0:
                raise InputError(f"{list_path}:{line_no}: negative label {label}; expected 0 <= label")
            full = path if os.path.isabs(path) else os.path.join(root, path)
            if not os.path.isfile(full):
                raise InputError(f"{list_path}:{line_no}: image {full} "
                                 + ("is not a file" if os.path.exists(full) else "does not exist"))
            items.append((full, label, len(items)))
    if not items:
        raise InputError(f"{list_path}: no entries; expected 'path<TAB>integer label' lines")
    sizes = np.array([os.path.getsize(p) for p, _, _ in items], np.int64)
    return SourcePlan("files", _records_files, items, sizes,
                      {"kind": "list", "path": os.path.abspath(list_path), "root": root})


# ----------------------------------------------------------------------------------------------- workers

_COUNTER = None  # multiprocessing.Value shared with the parent for the progress bar
_LOCAL_BAR = None  # the progress bar itself when converting in-process
_READERS: dict = {}


def _init_worker(counter):
    global _COUNTER
    _COUNTER = counter
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def _tick(n: int) -> None:
    if _LOCAL_BAR is not None:
        _LOCAL_BAR.update(n)
    elif _COUNTER is not None:
        with _COUNTER.get_lock():
            _COUNTER.value += n


_DECODE_CHECK = None


def training_decode_error(data: bytes) -> str | None:
    """None if `data` decodes completely with the training decoder (data_pipeline.input.decode_any), else
    TensorFlow's reason in one line."""
    global _DECODE_CHECK

    if _DECODE_CHECK is None:
        hide_gpus_from_tf()
        _DECODE_CHECK = tf.function(lambda e: tf.shape(decode_any(e)),
                                    input_signature=[tf.TensorSpec([], tf.string)]).get_concrete_function()
    if not data:
        return "empty (0 bytes)"
    try:
        _DECODE_CHECK(tf.constant(data))
    except tf.errors.OpError as err:
        return f"does not decode with TensorFlow ({tf_error_text(err)})"
    return None


_BATCH_CHECK = None


def training_decode_errors(datas: list) -> dict:
    """{position: reason} for the encoded images of `datas` that do not decode completely with the training
    decoder; one TensorFlow call for the whole list (per-image calls cost ~3x more), then the failures alone
    again for their reasons."""
    global _BATCH_CHECK

    if not datas:
        return {}
    if _BATCH_CHECK is None:
        hide_gpus_from_tf()

        def good_positions(batch):
            n = tf.shape(batch)[0]
            ok = tf.data.Dataset.from_tensor_slices((tf.range(n), batch)).map(
                lambda i, e: (i, tf.shape(decode_any(e)))).ignore_errors()
            none = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int32), tf.zeros([0, 3], tf.int32)))
            return ok.batch(1 << 30).concatenate(none).take(1).get_single_element()[0]

        _BATCH_CHECK = tf.function(good_positions, input_signature=[tf.TensorSpec([None], tf.string)])
    good = set(_BATCH_CHECK(tf.constant(list(datas))).numpy().tolist())
    return {i: training_decode_error(d) or "does not decode with TensorFlow"
            for i, d in enumerate(datas) if i not in good}


def tf_error_text(err) -> str:
    """A TensorFlow OpError's message without graph-node decorations, on one line."""
    text = re.sub(r"\{\{[^}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]", " ", str(getattr(err, "message", err)), flags=re.S)
    return " ".join(text.split())[:200] or type(err).__name__


# Producers yield one entry per planned item: (encoded bytes, label, source index, quality or None), or None
# for an item skipped as corrupt; _examples does the bookkeeping shared by all of them.

CHECK_CHUNK = 256  # images decode-checked per TensorFlow call


def _chunks(items: list, size: int = CHECK_CHUNK):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _read_rec_item(reader, path: str, key: int, offset: int, num_classes):
    """(payload, label) of one record; CorruptRecordError when framing, header, format or label is bad."""
    try:
        header, payload = recordio.unpack(reader.read_record(offset, key))
        label = recordio.header_label(header)
    except ValueError as err:
        if isinstance(err, recordio.CorruptRecordError):
            raise
        raise recordio.CorruptRecordError(path, key, offset, str(err)) from None
    if sniff_image_format(payload) is None:
        raise recordio.CorruptRecordError(path, key, offset, f"payload is not an image (starts with {payload[:8]!r})")
    if label < 0 or (num_classes and label >= num_classes):
        raise recordio.CorruptRecordError(path, key, offset, f"label {label} outside [0, {num_classes})")
    return payload, label


def _records_rec(task: dict, stats: dict):
    params = task["params"]
    path, num_classes = params["rec_path"], params.get("num_classes")
    reader = _READERS.get(path)
    if reader is None:
        reader = _READERS[path] = recordio.RecordIOReader(path, offsets={})
    for chunk in _chunks(task["items"]):
        entries = []  # (key, offset, payload, label) or (key, offset, CorruptRecordError)
        for key, offset in chunk:
            try:
                entries.append((key, offset, *_read_rec_item(reader, path, key, offset, num_classes)))
            except recordio.CorruptRecordError as err:
                entries.append((key, offset, err))
        if params.get("verify", True):
            readable = [i for i, e in enumerate(entries) if len(e) == 4]
            for pos, reason in training_decode_errors([entries[i][2] for i in readable]).items():
                key, offset = entries[readable[pos]][:2]
                entries[readable[pos]] = (key, offset, recordio.CorruptRecordError(path, key, offset,
                                                                                    f"image {reason}"))
        for entry in entries:
            if len(entry) == 3:
                err = entry[2]
                if not params.get("skip_corrupt"):
                    raise err  # CorruptRecordError: an InputError naming the file, record and byte offset
                stats["skipped"].append({"index": entry[0], "offset": entry[1], "reason": err.reason})
                yield None
                continue
            key, _, payload, label = entry
            yield payload, label, key, None


def _file_problem(path: str, stats: dict) -> tuple[bytes | None, str | None, bool]:
    """(bytes to store, None, needs the TensorFlow decode check) or (None, why the file is unusable, False)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return None, f"unreadable ({err.strerror or err})", False
    if not data:
        return None, "empty file (0 bytes)", False
    if sniff_image_format(data) is None:  # e.g. PGM: re-encode losslessly so TF can decode it
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            return None, (f"not an image TensorFlow or OpenCV can decode ({len(data)} bytes, starts with "
                          f"{data[:8]!r})"), False
        stats["re_encoded"] += 1
        return cv2.imencode(".png", image)[1].tobytes(), None, False
    return data, None, True


def _records_files(task: dict, stats: dict):
    verify = task["params"].get("verify", True)
    for chunk in _chunks(task["items"]):
        entries = [(item, *_file_problem(item[0], stats)) for item in chunk]
        if verify:
            checked = [i for i, e in enumerate(entries) if e[3]]
            for pos, reason in training_decode_errors([entries[i][1] for i in checked]).items():
                item, data = entries[checked[pos]][:2]
                entries[checked[pos]] = (item, None, f"{reason}, {len(data)} bytes", False)
        for (path, label, index), data, reason, _ in entries:
            if reason is not None:
                if task["params"].get("skip_corrupt"):
                    stats["skipped"].append({"index": index, "path": path, "reason": reason})
                    yield None
                    continue
                raise InputError(f"{path}: {reason} (pass --skip-corrupt to skip and count such images)")
            yield data, label, index, None


def _examples(task: dict, stats: dict):
    """Serialized examples of one shard, counting labels and ticking the progress bar every 256 items."""
    n = 0
    for n, record in enumerate(task["producer"](task, stats), 1):
        if record is not None:
            data, label, index, quality = record
            stats["labels"][label] = stats["labels"].get(label, 0) + 1
            yield make_example(data, label, index, quality=quality)
        if n % 256 == 0:
            _tick(256)
    _tick(n % 256)


def _write_task(task: dict) -> dict:
    stats = {"labels": {}, "skipped": [], "re_encoded": 0, "quality": []}
    count, size, digest = write_tfrecord_atomic(task["path"], _examples(task, stats))
    result = {"file": os.path.basename(task["path"]), "num_images": count, "num_bytes": size, "sha256": digest,
              "labels": {str(k): v for k, v in stats["labels"].items()}, "skipped": stats["skipped"],
              "re_encoded": stats["re_encoded"]}
    if stats["quality"]:
        result["quality"] = [round(float(q), 5) for q in stats["quality"]]
    write_json(task["progress"], {"plan_hash": task["plan_hash"], "result": result})
    return result


# ----------------------------------------------------------------------------------------------- driver

def split_by_bytes(sizes: np.ndarray, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges with roughly equal byte totals."""
    cum = np.cumsum(sizes)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, num_shards) / num_shards, side="left") + 1
    bounds = [0] + [int(c) for c in cuts] + [len(sizes)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _plan_hash(kind: str, items: list, params: dict) -> str:
    digest = hashlib.sha1(json.dumps([kind, params], sort_keys=True, default=str).encode())
    digest.update(repr(items).encode())
    return digest.hexdigest()


def _finished(task: dict) -> dict | None:
    """The saved result of a shard finished by an earlier run, if its file is intact; else None."""
    try:
        with open(task["progress"]) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    result = saved.get("result", {})
    if saved.get("plan_hash") != task["plan_hash"] or not os.path.exists(task["path"]):
        return None
    if os.path.getsize(task["path"]) != result.get("num_bytes") or file_sha256(task["path"]) != result.get("sha256"):
        return None
    return result


def _progress_bar(total: int, desc: str):
    # disable=None: only on a terminal, so logs and captured stderr hold just the result (or one error line)
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1, disable=None)


def describe_source(source: dict) -> str:
    kind = source.get("kind", "?")
    if kind == "synthetic":
        return "synthetic " + " ".join(f"{k}={source.get(k)}" for k in ("seed", "num_identities",
                                                                         "images_per_identity", "identity_offset"))
    return f"{kind} {source.get('path')}"


def source_fingerprint(plan: SourcePlan) -> str:
    """Identifies the source and its content plan (paths/offsets, byte sizes): equal only for the same data."""
    source = {k: v for k, v in plan.source.items() if k != "scan_skipped_corrupt"}
    digest = hashlib.sha1(json.dumps([plan.kind, source], sort_keys=True, default=str).encode())
    digest.update(repr(plan.items).encode())
    digest.update(np.asarray(plan.sizes, np.int64).tobytes())
    return digest.hexdigest()


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # present but unreadable: treated as a foreign source


def check_output_dir(out_dir: str, source: dict, force: bool = False, fingerprint: str | None = None) -> None:
    """Refuses (InputError) to write into out_dir when it holds a finished dataset (or an unfinished conversion)
    of another source: another kind or path, or (given `fingerprint`) other content. force=True allows it."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"output {out_dir} exists and is not a folder")
    if force:
        return
    for path, what in ((os.path.join(out_dir, manifest_lib.MANIFEST_NAME), "a finished dataset"),
                       (os.path.join(out_dir, PROGRESS_DIR, SOURCE_FILE), "an unfinished conversion")):
        old = _read_json(path)
        if old is None:
            continue
        old_source = (old.get("source") if isinstance(old, dict) else None) or {}
        same = all(old_source.get(k) == source.get(k) for k in ("kind", "path")) and \
            (source.get("kind") != "synthetic" or describe_source(old_source) == describe_source(source))
        if same and fingerprint is not None and old_source.get("fingerprint") not in (None, fingerprint):
            raise InputError(f"{out_dir} holds {what} of {describe_source(old_source)}, whose content has changed "
                             "since (other records, sizes or files); pass --force to replace it")
        if not same:
            raise InputError(f"{out_dir} holds {what} of {describe_source(old_source) if old_source else path}; "
                             f"refusing to replace it with {describe_source(source)} (pass --force to replace "
                             "it, or choose another output folder)")


def _clean_temporaries(out_dir: str, name: str) -> None:
    for stale in glob.glob(temp_pattern(out_dir, f"{name}-train.tfrecord-*")) + \
            glob.glob(temp_pattern(out_dir, manifest_lib.MANIFEST_NAME)) + \
            glob.glob(temp_pattern(os.path.join(out_dir, PROGRESS_DIR), "*")):
        os.remove(stale)  # a temporary file is never a finished shard


def write_dataset(plan: SourcePlan, out_dir: str, *, name: str = "faces", num_workers: int | None = None,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, num_shards: int | None = None, shuffle_seed: int | None = 0,
                  show_progress: bool = True, extra_manifest: dict | None = None, force: bool = False) -> dict:
    """Writes plan's images as TFRecord shards + manifest.json + tfds metadata in out_dir; returns the manifest.

    force: replace a dataset of another source in out_dir (otherwise InputError; the same source resumes).

    shuffle_seed: the order of images across shards is a seeded permutation (sources such as .rec are sorted
    by identity; mixing them at conversion makes the training shuffle buffer effective). None keeps order.
    num_workers: processes; 0 or 1 converts in this process. Default: in-process below 200k images (a
      spawned worker must import TensorFlow, ~5 s, and one process already writes >20k .rec images/s),
      all cores above.
    """
    out_dir = os.path.abspath(out_dir)
    n = len(plan.items)
    if n == 0:
        raise InputError(f"nothing to convert from {describe_source(plan.source)}")
    fingerprint = source_fingerprint(plan)
    check_output_dir(out_dir, plan.source, force, fingerprint)
    created = not os.path.exists(out_dir)
    os.makedirs(os.path.join(out_dir, PROGRESS_DIR), exist_ok=True)
    if force:  # from here on the folder no longer claims to hold the old dataset
        for old in (manifest_lib.MANIFEST_NAME, "dataset_info.json", "features.json"):
            if os.path.exists(os.path.join(out_dir, old)):
                os.remove(os.path.join(out_dir, old))
    _clean_temporaries(out_dir, name)
    source_record = {k: v for k, v in plan.source.items() if k != "scan_skipped_corrupt"} | {"fingerprint": fingerprint}
    write_json(os.path.join(out_dir, PROGRESS_DIR, SOURCE_FILE), {"source": source_record})
    try:
        return _write_shards(plan, out_dir, name, n, num_workers, shard_bytes, num_shards, shuffle_seed,
                             show_progress, extra_manifest, source_record)
    except BaseException:
        _clean_temporaries(out_dir, name)  # e.g. shards of pool workers terminated mid-write
        if created and not glob.glob(os.path.join(out_dir, f"{name}-train.tfrecord-*")):
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing finished: leave no half-made folder behind
        raise


def _write_shards(plan, out_dir, name, n, num_workers, shard_bytes, num_shards, shuffle_seed, show_progress,
                  extra_manifest, source_record) -> dict:
    order = np.arange(n) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(n)
    sizes = np.asarray(plan.sizes, np.int64)[order]
    if num_shards is None:
        num_shards = max(1, math.ceil(int(sizes.sum()) / shard_bytes))
    num_shards = min(num_shards, n)
    ranges = split_by_bytes(sizes, num_shards)
    num_shards = len(ranges)
    tasks = []
    for shard, (a, b) in enumerate(ranges):
        items = [plan.items[i] for i in order[a:b]]
        fname = shard_filename(name, shard, num_shards)
        tasks.append({"kind": plan.kind, "producer": plan.producer, "items": items, "params": plan.params, "path": os.path.join(out_dir, fname),
                      "progress": os.path.join(out_dir, PROGRESS_DIR, fname + ".json"),
                      "plan_hash": _plan_hash(plan.kind, items, plan.params)})
    for old in glob.glob(os.path.join(out_dir, f"{name}-train.tfrecord-*")):
        if old not in {t["path"] for t in tasks}:
            os.remove(old)  # shards of an earlier, different plan
    results: dict[int, dict] = {}
    for shard, task in enumerate(tasks):
        if (done := _finished(task)) is not None:
            results[shard] = done
    todo = [s for s in range(num_shards) if s not in results]
    resumed = num_shards - len(todo)
    if num_workers is None:
        num_workers = 0 if n < 200_000 else (os.cpu_count() or 1)
    start = time.time()
    bar = _progress_bar(n, f"{plan.source.get('kind')} -> {name}") if show_progress else None
    if bar is not None:
        bar.update(sum(results[s]["num_images"] + len(results[s]["skipped"]) for s in results))
    if num_workers <= 1 or len(todo) <= 1:
        global _LOCAL_BAR
        _LOCAL_BAR = bar
        try:
            for shard in todo:
                results[shard] = _write_task(tasks[shard])
        finally:
            _LOCAL_BAR = None
    else:
        ctx = mp.get_context("spawn")  # TensorFlow does not survive fork
        counter = ctx.Value("q", 0)
        with ctx.Pool(min(num_workers, len(todo)), initializer=_init_worker, initargs=(counter,)) as pool:
            pending = {shard: pool.apply_async(_write_task, (tasks[shard],)) for shard in todo}
            seen = 0
            while pending:
                time.sleep(0.2)
                for shard in [s for s, r in pending.items() if r.ready()]:
                    results[shard] = pending.pop(shard).get()  # re-raises a worker's error here
                if bar is not None:
                    bar.update(counter.value - seen)
                    seen = counter.value
    if bar is not None:
        bar.close()
    elapsed = time.time() - start
    manifest = _build_manifest(plan, name, tasks, results, resumed, elapsed, extra_manifest)
    manifest["source"] = source_record
    write_json(os.path.join(out_dir, manifest_lib.MANIFEST_NAME), manifest)
    manifest_lib.write_tfds_metadata(out_dir, manifest)
    if os.path.exists(os.path.join(out_dir, PROGRESS_DIR, SOURCE_FILE)):
        os.remove(os.path.join(out_dir, PROGRESS_DIR, SOURCE_FILE))  # the manifest records the source now
    return manifest


def _build_manifest(plan, name, tasks, results, resumed, elapsed, extra) -> dict:
    shards, class_counts, skipped, quality = [], {}, list(plan.source.get("scan_skipped_corrupt", [])), []
    re_encoded = 0
    for shard in range(len(tasks)):
        r = results[shard]
        shards.append({k: r[k] for k in ("file", "num_images", "num_bytes", "sha256")})
        for label, count in r["labels"].items():
            class_counts[int(label)] = class_counts.get(int(label), 0) + count
        skipped += r["skipped"]
        re_encoded += r["re_encoded"]
        quality += r.get("quality", [])
    num_classes = len(plan.class_names) if plan.class_names is not None else \
        (max(class_counts) + 1 if class_counts else 0)
    class_names = plan.class_names if plan.class_names is not None else [str(i) for i in range(num_classes)]
    manifest = {
        "format": manifest_lib.FORMAT, "version": 1, "name": name,
        "num_images": sum(s["num_images"] for s in shards), "num_classes": num_classes,
        "class_names": class_names, "class_counts": [class_counts.get(i, 0) for i in range(num_classes)],
        "channel_order": plan.channel_order, "features": ["image", "label", "index"] + (["quality"] if quality else []),
        "has_quality": bool(quality), "shards": shards, "source": {k: v for k, v in plan.source.items()
                                                                   if k != "scan_skipped_corrupt"},
        "num_skipped_corrupt": len(skipped), "skipped_corrupt": skipped, "num_re_encoded_png": re_encoded,
        "resumed_shards": resumed, "seconds": round(elapsed, 2),
    }
    if quality:
        q = np.asarray(quality)
        manifest["quality"] = {"mean": float(q.mean()), "min": float(q.min()), "max": float(q.max()),
                               "histogram": np.histogram(q, bins=10, range=(0, 1))[0].tolist()}
    manifest.update(extra or {})
    return manifest


def convert_rec(rec_path: str, out_dir: str, *, idx_path: str | None = None, skip_corrupt: bool = False,
                channel_order: str = "RGB", force: bool = False, verify: bool = True, **kwargs) -> dict:
    """InsightFace .rec(+.idx) or dataset folder (train.rec, train.idx, property) -> TFRecords. Stored JPEGs
    decode to RGB (mxnet convention) unless told BGR."""
    rec, _, _ = resolve_rec(rec_path, idx_path)
    check_output_dir(out_dir, {"kind": "rec", "path": rec}, force)  # before scanning a large file
    plan = plan_rec(rec_path, idx_path, skip_corrupt)
    plan.params["idx"] = plan.source["idx"]
    plan.channel_order = channel_order
    if not verify:  # only then in params: the plan hash (and resuming) of a default run is unchanged
        plan.params["verify"] = False
    return write_dataset(plan, out_dir, force=force, **kwargs)


def convert_folder(root: str, out_dir: str, *, channel_order: str = "RGB", skip_corrupt: bool = False,
                   force: bool = False, verify: bool = True, **kwargs) -> dict:
    check_output_dir(out_dir, {"kind": "folder", "path": os.path.abspath(root)}, force)
    plan = plan_folder(root)
    plan.channel_order, plan.params["skip_corrupt"] = channel_order, skip_corrupt
    if not verify:
        plan.params["verify"] = False
    return write_dataset(plan, out_dir, force=force, **kwargs)


def convert_list(list_path: str, out_dir: str, *, root: str | None = None, channel_order: str = "RGB",
                 skip_corrupt: bool = False, force: bool = False, verify: bool = True, **kwargs) -> dict:
    check_output_dir(out_dir, {"kind": "list", "path": os.path.abspath(list_path)}, force)
    plan = plan_list(list_path, root)
    plan.channel_order, plan.params["skip_corrupt"] = channel_order, skip_corrupt
    if not verify:
        plan.params["verify"] = False
    return write_dataset(plan, out_dir, force=force, **kwargs)
