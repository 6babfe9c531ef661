"""Dataset preparation (the `adaface-jax prepare` command): sharded TFRecords (+ manifest.json + tfds metadata)
from .rec, an image folder or a list file. (Model weights are converted by ``adaface_jax.convert``.)

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
again for the same source (kind, path and content plan); anything else needs force=True. A folder that
holds files a conversion would replace (shards, tfds metadata) but no dataset of ours is refused too.

Sources and outputs are local paths or gs:// URLs, all through ``adaface_jax.io``: a shard is built in a
local temporary file and renamed (local) or uploaded once, whole (gs://), so a shard object never exists
half-written. The manifest is the finished marker and is written LAST, after every shard and the tfds
metadata; a run that is about to change a finished dataset (other shards, a re-written shard) removes the
manifest FIRST. An interrupted conversion therefore never looks finished: `check` and the training input
refuse it naming the unfinished conversion, and rerunning the same command resumes it.

Image folders (`plan_folder`): ROOT/<identity>/<images> (images may sit in subfolders of an identity
folder). Refused, in one line naming the folder: ROOT holding images directly and no identity folders; ROOT
holding a single folder of folders (an archive's wrapper, e.g. casia/CASIA-WebFace/<id>/...: the message
names the folder to pass); a single identity; an identity folder with no image in a format we read (it
would be an empty class); a folder that cannot be listed. Files in formats we do not read (e.g. .heic,
.txt) and images lying directly in ROOT next to identity folders are skipped, and counted and named in the
manifest (`skipped_files`) and in the command's summary. Names starting with '.' are ignored. A FIFO,
socket or broken link is an unreadable image: an error, or skipped and counted with skip_corrupt.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import time
from typing import Callable

import cv2
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from adaface_jax import io
from adaface_jax.errors import InputError
from data_pipeline.input import decode_any, hide_gpus_from_tf

from . import manifest as manifest_lib
from . import recordio
from .tfrecord import file_sha256, make_example, shard_filename, write_tfrecord_atomic

DEFAULT_SHARD_BYTES = 150 * 1024 * 1024
PROGRESS_DIR = manifest_lib.PROGRESS_DIR
SOURCE_FILE = manifest_lib.SOURCE_FILE  # in PROGRESS_DIR: the source an unfinished conversion is writing
REMOTE_THREADS = 32  # concurrent requests when listing sizes or reading images of a gs:// source
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
    skipped_files: list = dataclasses.field(default_factory=list)  # [{'path', 'reason'}]: not in a format we read


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
    text = io.read_text(path).strip()
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
    src = io.check_path(src, "source")
    if io.isdir(src):
        rec = io.join(src, "train.rec")
        if not io.isfile(rec):
            recs = io.glob(src, "*.rec")
            if len(recs) != 1:
                raise InputError(f"{src}: expected an InsightFace dataset folder holding train.rec (+ train.idx, "
                                 f"property); found {len(recs)} .rec files {[io.basename(r) for r in recs][:5]}")
            rec = recs[0]
    elif io.exists(src):
        rec = src
    else:
        raise FileNotFoundError(2, "No such file or directory", src)
    if idx_path is None:
        guess = os.path.splitext(rec)[0] + ".idx"
        idx_path = guess if io.exists(guess) else None
    else:
        idx_path = io.check_path(idx_path, "--idx")
    prop = io.join(io.dirname(rec), "property")
    return rec, idx_path, prop if io.isfile(prop) else None


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
    source = {"kind": "rec", "path": rec_path, "idx": idx_used and io.check_path(idx_used), "bytes": size,
              "scan_skipped_corrupt": scan_corrupt}
    if prop is not None:
        source["property"] = {"path": prop_path, "num_classes": prop[0], "image_size": list(prop[1:])}
    plan = SourcePlan("rec", _records_rec, [(int(k), int(o)) for k, o in zip(keys, offsets)], nxt - offsets, source,
                      {"rec_path": rec_path, "skip_corrupt": skip_corrupt})
    if num_classes:
        plan.params["num_classes"] = num_classes
        plan.class_names = [str(i) for i in range(num_classes)]
    return plan


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_folder(folder: str) -> tuple[list, list, list]:
    """(subfolders, files, other entries) of a folder, names starting with '.' left out; InputError naming the
    folder when it cannot be listed (an unreadable folder is an error, never a silently empty one)."""
    try:
        dirs, files, other = io.scandir(folder)
    except OSError as err:
        raise InputError(f"folder {folder} cannot be read ({err.strerror or err}); every folder of an image "
                         "dataset must be readable") from None
    return tuple([n for n in names if not n.startswith(".")] for names in (dirs, files, other))


def _sizes(paths: list) -> np.ndarray:
    """Byte sizes; a gs:// source is asked REMOTE_THREADS at a time (one request per object)."""
    if paths and io.is_remote(paths[0]):
        with concurrent.futures.ThreadPoolExecutor(REMOTE_THREADS) as pool:
            return np.array(list(pool.map(io.getsize, paths)), np.int64)
    return np.array([io.getsize(p) for p in paths], np.int64)


def _wrapped_identities(root: str, only: str) -> str | None:
    """The folder the identities sit in when ROOT holds nothing but the folder ``only`` and it (and any single
    folder below it) holds only folders -- the way archives unpack (casia/CASIA-WebFace/<id>/...); else None."""
    folder = io.join(root, only)
    while True:
        dirs, files, _ = _list_folder(folder)
        if not dirs or any(_is_image(f) for f in files):
            return None
        if len(dirs) > 1:
            return folder
        folder = io.join(folder, dirs[0])


def _identity_images(folder: str) -> tuple[list, list, list]:
    """(image paths, other file paths, non-regular entry paths) under one identity folder, in the order of a
    sorted os.walk (folders by path, files by name)."""
    listed, todo = [], [folder]
    while todo:
        current = todo.pop()
        dirs, files, other = _list_folder(current)
        listed.append((current, files, other))
        todo += [io.join(current, d) for d in dirs]
    images, skipped, irregular = [], [], []
    for current, files, other in sorted(listed, key=lambda entry: entry[0]):
        for name in files:
            (images if _is_image(name) else skipped).append(io.join(current, name))
        irregular += [io.join(current, name) for name in other]
    return images, skipped, irregular


def _format_counts(paths: list) -> str:
    counts: dict = {}
    for p in paths:
        ext = os.path.splitext(io.basename(p))[1].lower() or "no extension"
        counts[ext] = counts.get(ext, 0) + 1
    return ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items(), key=lambda kv: -kv[1])[:4])


def plan_folder(root: str, skip_corrupt: bool = False) -> SourcePlan:
    """One subfolder per identity; labels follow the lexicographic sort of folder names (like ImageFolder).

    Refuses the layouts and folders the module doc lists; skipped files are in ``plan.skipped_files``.
    skip_corrupt: an entry that is not a regular file (FIFO, socket, broken link) is skipped and counted
    instead of stopping the conversion."""
    root = io.check_path(root, "image folder")
    if not io.isdir(root):
        raise InputError(f"image folder {root} " + ("is not a folder" if io.exists(root) else "does not exist"))
    class_names, top_files, _ = _list_folder(root)
    top_images = [f for f in top_files if _is_image(f)]
    if not class_names:
        if top_images:
            raise InputError(f"{root} holds {len(top_images)} images directly and no identity folders; expected "
                             f"one folder per identity, {root}/<identity>/<image>")
        raise InputError(f"{root}: no identity subfolders found (expected {root}/<identity>/<image>)")
    if len(class_names) == 1 and not top_images:
        deeper = _wrapped_identities(root, class_names[0])
        if deeper is not None:
            raise InputError(f"{root} holds only the folder {class_names[0]}, whose subfolders look like the "
                             f"identities (the way archives unpack); pass {deeper} as the image folder")
    items, skipped, irregular, empty = [], [], [], []
    for label, name in enumerate(class_names):
        images, others, odd = _identity_images(io.join(root, name))
        if not images:
            empty.append((name, others + odd))
        items += [(path, label, len(items) + k) for k, path in enumerate(images)]
        skipped += [{"path": path, "reason": "not an image format we read"} for path in others]
        irregular += odd
    if not items:
        found = [p for _, files in empty for p in files]
        raise InputError(f"{root}: no images with extensions {IMAGE_EXTENSIONS} in its {len(class_names)} "
                         "identity subfolders" + (f" (found {len(found)} other files: {_format_counts(found)})"
                                                  if found else ""))
    if empty:
        named = "; ".join(f"{name} ({_format_counts(files) if files else 'empty'})" for name, files in empty[:5])
        raise InputError(f"{root}: {len(empty)} of {len(class_names)} identity folders hold no image in a format we "
                         f"read ({named}{'; ...' if len(empty) > 5 else ''}): each would be an empty class; convert "
                         f"their images to one of {IMAGE_EXTENSIONS} or remove those folders")
    if len(class_names) == 1:
        inner, _, _ = _list_folder(io.join(root, class_names[0]))
        hint = (f"; if the {len(inner)} subfolders of {class_names[0]} are the identities, pass "
                f"{io.join(root, class_names[0])}" if len(inner) > 1 else "")
        raise InputError(f"{root} holds a single identity folder ({class_names[0]}, {len(items)} images); a "
                         f"dataset needs one folder per identity, at least 2{hint}")
    skipped = [{"path": io.join(root, f), "reason": "directly in the image folder, not in an identity folder"}
               for f in top_images] + skipped
    if irregular and not skip_corrupt:
        raise InputError(f"{irregular[0]}: not a regular file (a FIFO, socket, device or broken link), so it cannot "
                         f"be read as an image ({len(irregular)} such entries; pass --skip-corrupt to skip and count "
                         "them)")
    scan_skipped = [{"path": p, "reason": "not a regular file (FIFO, socket, device or broken link)"}
                    for p in irregular]
    sizes = _sizes([p for p, _, _ in items])
    source = {"kind": "folder", "path": root}
    if scan_skipped:
        source["scan_skipped_corrupt"] = scan_skipped
    return SourcePlan("files", _records_files, items, sizes, source, class_names=class_names,
                      skipped_files=skipped)


def _size_or_none(path: str) -> int | None:
    try:
        return io.getsize(path) if io.isfile(path) else None
    except OSError:
        return None


def plan_list(list_path: str, root: str | None = None) -> SourcePlan:
    """A list file of `path<TAB>label` lines (paths relative to `root`, default: the list's folder; absolute
    paths and gs:// URLs as they are)."""
    list_path = io.check_path(list_path, "list file")
    root = io.check_path(root, "--root") if root else io.dirname(list_path)
    if io.isdir(list_path):
        raise InputError(f"{list_path}: is a folder; expected a list file of 'path<TAB>label' lines "
                         "(use `prepare folder` for a folder of identity subfolders)")
    entries = []  # (line number, full path, label)
    with io.open(list_path, "r", encoding="utf-8", errors="replace") as f:
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
            full = io.check_path(path, f"{list_path}:{line_no}: image") if io.is_remote(path) or os.path.isabs(path) \
                else io.join(root, path)
            if not io.is_remote(full) and not io.isfile(full):  # local: stop at the first bad line
                raise InputError(f"{list_path}:{line_no}: image {full} "
                                 + ("is not a file" if io.exists(full) else "does not exist"))
            entries.append((line_no, full, label))
    if not entries:
        raise InputError(f"{list_path}: no entries; expected 'path<TAB>integer label' lines")
    paths = [full for _, full, _ in entries]
    if any(io.is_remote(p) for p in paths):  # one request per object, REMOTE_THREADS at a time
        with concurrent.futures.ThreadPoolExecutor(REMOTE_THREADS) as pool:
            found = list(pool.map(_size_or_none, paths))
        for (line_no, full, _), size in zip(entries, found):
            if size is None:
                raise InputError(f"{list_path}:{line_no}: image {full} does not exist or is not a file")
        sizes = np.array(found, np.int64)
    else:
        sizes = _sizes(paths)
    items = [(full, label, k) for k, (_, full, label) in enumerate(entries)]
    return SourcePlan("files", _records_files, items, sizes, {"kind": "list", "path": list_path, "root": root})


# ----------------------------------------------------------------------------------------------- workers

_COUNTER = None  # multiprocessing.Value shared with the parent for the progress bar
_LOCAL_BAR = None  # the progress bar itself when converting in-process


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
    # opened per shard and closed with it (a gs:// file left open would complain at interpreter exit)
    with recordio.RecordIOReader(path, offsets={}) as reader:
        yield from _rec_entries(task, stats, reader, path, num_classes)


def _rec_entries(task: dict, stats: dict, reader, path: str, num_classes):
    params = task["params"]
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


def _read_file(path: str) -> bytes | str:
    """The file's bytes, or why it cannot be read (one line)."""
    try:
        with io.open(path, "rb") as f:
            return f.read()
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    except tf.errors.OpError as err:  # gs:// reads go through tf.io.gfile
        return f"unreadable ({tf_error_text(err)})"


def _file_problem(path: str, stats: dict, data: bytes | str | None = None) -> tuple[bytes | None, str | None, bool]:
    """(bytes to store, None, needs the TensorFlow decode check) or (None, why the file is unusable, False).
    data: the file's content (or why it is unreadable) when already read."""
    data = _read_file(path) if data is None else data
    if isinstance(data, str):
        return None, data, False
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
    pool = None
    try:
        for chunk in _chunks(task["items"]):
            paths = [item[0] for item in chunk]
            if pool is None and any(io.is_remote(p) for p in paths):
                # one request per image: REMOTE_THREADS in flight, so the latency is not paid image by image
                pool = concurrent.futures.ThreadPoolExecutor(REMOTE_THREADS)
            datas = list(pool.map(_read_file, paths)) if pool is not None else [None] * len(chunk)
            entries = [(item, *_file_problem(item[0], stats, data)) for item, data in zip(chunk, datas)]
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
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


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
    result = {"file": io.basename(task["path"]), "num_images": count, "num_bytes": size, "sha256": digest,
              "labels": {str(k): v for k, v in stats["labels"].items()}, "skipped": stats["skipped"],
              "re_encoded": stats["re_encoded"]}
    if stats["quality"]:
        result["quality"] = [round(float(q), 5) for q in stats["quality"]]
    io.write_json(task["progress"], {"plan_hash": task["plan_hash"], "result": result})
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
    saved = _read_json(task["progress"])
    if not isinstance(saved, dict) or not isinstance(saved.get("result"), dict):
        return None
    result = saved["result"]
    if saved.get("plan_hash") != task["plan_hash"] or not io.isfile(task["path"]):
        return None
    if io.getsize(task["path"]) != result.get("num_bytes") or file_sha256(task["path"]) != result.get("sha256"):
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
    """The JSON in ``path``; None when there is no such file; {} when it is there but unreadable."""
    if not io.isfile(path):
        return None
    try:
        return json.loads(io.read_text(path))
    except (OSError, ValueError):
        return {}  # present but unreadable: treated as a foreign source
    except tf.errors.OpError:
        return {}


def _shard_files(out_dir: str, name: str) -> list:
    return io.glob(out_dir, f"{name}-train.tfrecord-*")


def check_output_dir(out_dir: str, source: dict, force: bool = False, fingerprint: str | None = None,
                     name: str = "faces") -> str:
    """Refuses (InputError) to write into out_dir when it is not a folder, when it holds a finished dataset (or an
    unfinished conversion) of another source: another kind or path, or (given `fingerprint`) other content, or
    when it holds files a conversion named `name` would replace (shards, tfds metadata) without holding a
    dataset of ours. force=True allows the last three. Returns the canonical path."""
    out_dir = io.check_output_dir(out_dir, "output folder")
    if force or not io.isdir(out_dir):
        return out_dir
    ours = False
    for path, what in ((io.join(out_dir, manifest_lib.MANIFEST_NAME), "a finished dataset"),
                       (io.join(out_dir, PROGRESS_DIR, SOURCE_FILE), "an unfinished conversion")):
        old = _read_json(path)
        if old is None:
            continue
        ours = True
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
    if not ours:
        theirs = [n for n in manifest_lib.TFDS_FILES if io.exists(io.join(out_dir, n))] + \
            [io.basename(p) for p in _shard_files(out_dir, name)]
        if theirs:
            raise InputError(f"{out_dir} holds {', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''} but no "
                             "dataset written by adaface-jax; refusing to replace those files (choose another output "
                             "folder, or pass --force to replace them)")
    return out_dir


def _clean_temporaries(out_dir: str, name: str) -> None:
    """Removes the local temporary files a killed run left in out_dir (a gs:// output has none: its temporary
    files live on the local disk until their one upload)."""
    if io.is_remote(out_dir):
        return
    pattern = lambda target: f".{target}.*{io.TEMP_SUFFIX}"  # noqa: E731  (names io.atomic_path gives them)
    for stale in io.glob(out_dir, pattern(f"{name}-train.tfrecord-*")) + \
            io.glob(out_dir, pattern(manifest_lib.MANIFEST_NAME)) + \
            io.glob(io.join(out_dir, PROGRESS_DIR), pattern("*")):
        io.remove(stale)  # a temporary file is never a finished shard


def _unpublish(out_dir: str) -> None:
    """The folder stops claiming to hold a finished dataset: the manifest goes first, then the tfds metadata."""
    for marker in (manifest_lib.MANIFEST_NAME, *manifest_lib.TFDS_FILES):
        io.remove(io.join(out_dir, marker))


def write_dataset(plan: SourcePlan, out_dir: str, *, name: str = "faces", num_workers: int | None = None,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, num_shards: int | None = None, shuffle_seed: int | None = 0,
                  show_progress: bool = True, extra_manifest: dict | None = None, force: bool = False,
                  before_manifest: Callable | None = None) -> dict:
    """Writes plan's images as TFRecord shards + tfds metadata + manifest.json (last) in out_dir (a local folder
    or gs://); returns the manifest.

    force: replace a dataset of another source in out_dir (otherwise InputError; the same source resumes).
    before_manifest: called with out_dir once every shard is written, before the manifest (for outputs that
      belong to the dataset, such as a verification .bin); the dict it returns goes into the manifest.

    shuffle_seed: the order of images across shards is a seeded permutation (sources such as .rec are sorted
    by identity; mixing them at conversion makes the training shuffle buffer effective). None keeps order.
    num_workers: processes; 0 or 1 converts in this process. Default: in-process below 200k images (a
      spawned worker first spends seconds importing TensorFlow, which pays off only for a large dataset),
      all cores above.
    """
    out_dir = io.check_path(out_dir, "output folder")
    n = len(plan.items)
    if n == 0:
        raise InputError(f"nothing to convert from {describe_source(plan.source)}")
    fingerprint = source_fingerprint(plan)
    check_output_dir(out_dir, plan.source, force, fingerprint, name)
    created = not io.exists(out_dir)
    io.makedirs(io.join(out_dir, PROGRESS_DIR))
    if force:  # from here on the folder no longer claims to hold the old dataset
        _unpublish(out_dir)
    _clean_temporaries(out_dir, name)
    source_record = {k: v for k, v in plan.source.items() if k != "scan_skipped_corrupt"} | {"fingerprint": fingerprint}
    io.write_json(io.join(out_dir, PROGRESS_DIR, SOURCE_FILE), {"source": source_record})
    try:
        return _write_shards(plan, out_dir, name, n, num_workers, shard_bytes, num_shards, shuffle_seed,
                             show_progress, extra_manifest, source_record, before_manifest)
    except BaseException:
        _clean_temporaries(out_dir, name)  # e.g. shards of pool workers terminated mid-write
        if created and not _shard_files(out_dir, name):
            io.rmtree(out_dir)  # nothing finished: leave no half-made folder behind
        raise


def _write_shards(plan, out_dir, name, n, num_workers, shard_bytes, num_shards, shuffle_seed, show_progress,
                  extra_manifest, source_record, before_manifest=None) -> dict:
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
        tasks.append({"kind": plan.kind, "producer": plan.producer, "items": items, "params": plan.params,
                      "path": io.join(out_dir, fname), "progress": io.join(out_dir, PROGRESS_DIR, fname + ".json"),
                      "plan_hash": _plan_hash(plan.kind, items, plan.params)})
    planned = {t["path"] for t in tasks}
    stale = [old for old in _shard_files(out_dir, name) if old not in planned]  # shards of an earlier plan
    results: dict[int, dict] = {}
    for shard, task in enumerate(tasks):
        if (done := _finished(task)) is not None:
            results[shard] = done
    todo = [s for s in range(num_shards) if s not in results]
    if todo or stale:  # the dataset changes: it must stop looking finished before anything in it does
        _unpublish(out_dir)
    for old in stale:
        io.remove(old)
        io.remove(io.join(out_dir, PROGRESS_DIR, io.basename(old) + ".json"))
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
    if before_manifest is not None:
        manifest.update(before_manifest(out_dir) or {})
    # the manifest is the finished marker: written LAST, after every shard and the tfds metadata
    manifest_lib.write_tfds_metadata(out_dir, manifest)
    io.write_json(io.join(out_dir, manifest_lib.MANIFEST_NAME), manifest)
    io.remove(io.join(out_dir, PROGRESS_DIR, SOURCE_FILE))  # the manifest records the source now
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
        "num_skipped_files": len(plan.skipped_files), "skipped_files": plan.skipped_files,
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
    # before scanning a large file
    check_output_dir(out_dir, {"kind": "rec", "path": rec}, force, name=kwargs.get("name", "faces"))
    plan = plan_rec(rec_path, idx_path, skip_corrupt)
    plan.params["idx"] = plan.source["idx"]
    plan.channel_order = channel_order
    if not verify:  # only then in params: the plan hash (and resuming) of a default run is unchanged
        plan.params["verify"] = False
    return write_dataset(plan, out_dir, force=force, **kwargs)


def _outside(out_dir: str, src: str, what: str) -> None:
    """Refuses an output folder that is the source folder or lies inside it (it would become part of the source)."""
    out_dir, src = io.check_path(out_dir, "output folder"), io.check_path(src, what)
    if out_dir == src or out_dir.startswith(io.join(src, "")):
        raise InputError(f"output folder {out_dir} is inside the {what} {src}; choose a folder outside it")


def _write_planned(plan, out_dir: str, channel_order: str, skip_corrupt: bool, verify: bool, force: bool,
                   **kwargs) -> dict:
    """A folder's or a list's plan, with the options both converters take, written as TFRecords."""
    plan.channel_order, plan.params["skip_corrupt"] = channel_order, skip_corrupt
    if not verify:
        plan.params["verify"] = False
    return write_dataset(plan, out_dir, force=force, **kwargs)


def convert_folder(root: str, out_dir: str, *, channel_order: str = "RGB", skip_corrupt: bool = False,
                   force: bool = False, verify: bool = True, **kwargs) -> dict:
    """An image folder (ROOT/<identity>/<images>, see the module doc for what is refused or skipped) -> TFRecords."""
    root = io.check_path(root, "image folder")
    _outside(out_dir, root, "image folder")
    check_output_dir(out_dir, {"kind": "folder", "path": root}, force, name=kwargs.get("name", "faces"))
    plan = plan_folder(root, skip_corrupt)
    return _write_planned(plan, out_dir, channel_order, skip_corrupt, verify, force, **kwargs)


def convert_list(list_path: str, out_dir: str, *, root: str | None = None, channel_order: str = "RGB",
                 skip_corrupt: bool = False, force: bool = False, verify: bool = True, **kwargs) -> dict:
    list_path = io.check_path(list_path, "list file")
    check_output_dir(out_dir, {"kind": "list", "path": list_path}, force, name=kwargs.get("name", "faces"))
    plan = plan_list(list_path, root)
    return _write_planned(plan, out_dir, channel_order, skip_corrupt, verify, force, **kwargs)
