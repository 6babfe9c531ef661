"""Converters to sharded TFRecords (+ manifest.json + tfds metadata): from .rec, an image folder, a list file.

Work is planned up front (which source items go to which shard), shards are written in parallel worker
processes, each through a temporary name and a rename, and a finished shard leaves a small progress record
(plan hash + sha256). Rerunning an interrupted conversion verifies those shards and writes only the rest.
Image bytes are copied as stored (no re-encode); only formats TensorFlow cannot decode (e.g. PGM) are
re-encoded losslessly to PNG, and the manifest counts them.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import multiprocessing as mp
import os
import time
from typing import Callable

import numpy as np

from . import manifest as manifest_lib
from . import recordio
from .tfrecord import file_sha256, make_example, shard_filename, write_tfrecord_atomic

DEFAULT_SHARD_BYTES = 150 * 1024 * 1024
PROGRESS_DIR = ".progress"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp", ".gif")


@dataclasses.dataclass
class SourcePlan:
    """What to convert: `items` (one tuple per image, meaning depends on kind) and their byte sizes."""
    kind: str  # "rec" | "files" | "synthetic"
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


def plan_rec(rec_path: str, idx_path: str | None = None, skip_corrupt: bool = False) -> SourcePlan:
    """Images of an InsightFace .rec (§5.5 key rule); sizes from offsets. Without .idx the file is scanned."""
    with recordio.RecordIOReader(rec_path, idx_path, skip_corrupt=skip_corrupt) as reader:
        keys = reader.image_keys()
        offsets = np.array([reader.offsets[k] for k in keys], np.int64)
        all_offsets = np.array(sorted(reader.offsets.values()) + [reader.file_size], np.int64)
        nxt = all_offsets[np.searchsorted(all_offsets, offsets, side="right")]
        scan_corrupt = [{"index": i, "offset": o, "reason": r} for i, o, r in reader.corrupt]
        idx_used = reader.idx_path
    return SourcePlan("rec", [(int(k), int(o)) for k, o in zip(keys, offsets)], nxt - offsets,
                      {"kind": "rec", "path": os.path.abspath(rec_path), "idx": idx_used and os.path.abspath(idx_used),
                       "scan_skipped_corrupt": scan_corrupt},
                      {"rec_path": os.path.abspath(rec_path), "skip_corrupt": skip_corrupt})


def plan_folder(root: str) -> SourcePlan:
    """One subfolder per identity; labels follow the lexicographic sort of folder names (like ImageFolder)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"image folder {root} does not exist")
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not class_names:
        raise ValueError(f"{root}: no identity subfolders found (expected {root}/<identity>/<image>)")
    items = []
    for label, name in enumerate(class_names):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            for fname in sorted(files):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.join(dirpath, fname), label, len(items)))
    if not items:
        raise ValueError(f"{root}: no images with extensions {IMAGE_EXTENSIONS}")
    sizes = np.array([os.path.getsize(p) for p, _, _ in items], np.int64)
    return SourcePlan("files", items, sizes, {"kind": "folder", "path": root}, class_names=class_names)


def plan_list(list_path: str, root: str | None = None) -> SourcePlan:
    """A list file of `path<TAB>label` lines (paths relative to `root`, default: the list's folder)."""
    root = os.path.abspath(root or os.path.dirname(os.path.abspath(list_path)))
    items = []
    with open(list_path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                parts = line.rsplit(None, 1)
            try:
                path, label = parts[0], int(parts[1])
            except (IndexError, ValueError):
                raise ValueError(f"{list_path}:{line_no}: expected 'path<TAB>integer label', got {line.rstrip()!r}")
            if label < 0:
                raise ValueError(f"{list_path}:{line_no}: negative label {label}")
            full = path if os.path.isabs(path) else os.path.join(root, path)
            if not os.path.exists(full):
                raise FileNotFoundError(f"{list_path}:{line_no}: image {full} does not exist")
            items.append((full, label, len(items)))
    if not items:
        raise ValueError(f"{list_path}: no entries")
    sizes = np.array([os.path.getsize(p) for p, _, _ in items], np.int64)
    return SourcePlan("files", items, sizes, {"kind": "list", "path": os.path.abspath(list_path), "root": root})


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


# Producers yield one entry per planned item: (encoded bytes, label, source index, quality or None), or None
# for an item skipped as corrupt; _examples does the bookkeeping shared by all of them.

def _records_rec(task: dict, stats: dict):
    path = task["params"]["rec_path"]
    reader = _READERS.get(path)
    if reader is None:
        reader = _READERS[path] = recordio.RecordIOReader(path, offsets={})
    for key, offset in task["items"]:
        try:
            header, payload = recordio.unpack(reader.read_record(offset, key))
            if sniff_image_format(payload) is None:
                raise recordio.CorruptRecordError(path, key, offset,
                                                  f"payload is not an image (starts with {payload[:8]!r})")
        except (recordio.CorruptRecordError, ValueError) as err:
            if not isinstance(err, recordio.CorruptRecordError):
                err = recordio.CorruptRecordError(path, key, offset, str(err))
            if not task["params"].get("skip_corrupt"):
                raise err from None
            stats["skipped"].append({"index": key, "offset": offset, "reason": err.reason})
            yield None
            continue
        yield payload, recordio.header_label(header), key, None


def _records_files(task: dict, stats: dict):
    import cv2  # noqa: PLC0415

    for path, label, index in task["items"]:
        with open(path, "rb") as f:
            data = f.read()
        if sniff_image_format(data) is None:  # e.g. PGM: re-encode losslessly so TF can decode it
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if image is None:
                if task["params"].get("skip_corrupt"):
                    stats["skipped"].append({"index": index, "path": path, "reason": "not a decodable image"})
                    yield None
                    continue
                raise ValueError(f"{path}: not a decodable image ({len(data)} bytes)")
            data = cv2.imencode(".png", image)[1].tobytes()
            stats["re_encoded"] += 1
        yield data, label, index, None


def _records_synthetic(task: dict, stats: dict):
    from . import synthetic  # noqa: PLC0415

    params = task["params"]
    for identity, image_index, index in task["items"]:
        data, quality = synthetic.render_encoded(params["seed"], identity, image_index, params)
        stats["quality"].append(quality)
        yield data, identity - params.get("identity_offset", 0), index, quality


PRODUCERS: dict[str, Callable] = {"rec": _records_rec, "files": _records_files, "synthetic": _records_synthetic}


def _examples(task: dict, stats: dict):
    """Serialized examples of one shard, counting labels and ticking the progress bar every 256 items."""
    n = 0
    for n, record in enumerate(PRODUCERS[task["kind"]](task, stats), 1):
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
    manifest_lib.write_json_atomic(task["progress"], {"plan_hash": task["plan_hash"], "result": result})
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
    from tqdm import tqdm  # noqa: PLC0415
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)


def write_dataset(plan: SourcePlan, out_dir: str, *, name: str = "faces", num_workers: int | None = None,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, num_shards: int | None = None, shuffle_seed: int | None = 0,
                  show_progress: bool = True, extra_manifest: dict | None = None) -> dict:
    """Writes plan's images as TFRecord shards + manifest.json + tfds metadata in out_dir; returns the manifest.

    shuffle_seed: the order of images across shards is a seeded permutation (sources such as .rec are sorted
    by identity; mixing them at conversion makes the training shuffle buffer effective). None keeps order.
    num_workers: processes; 0 or 1 converts in this process. Default: in-process below 200k images (a
      spawned worker must import TensorFlow, ~5 s, and one process already writes >20k .rec images/s),
      all cores above.
    """
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.join(out_dir, PROGRESS_DIR), exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "*.tmp*")):
        os.remove(stale)  # a temporary file is never a finished shard
    n = len(plan.items)
    if n == 0:
        raise ValueError(f"nothing to convert from {plan.source}")
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
        tasks.append({"kind": plan.kind, "items": items, "params": plan.params, "path": os.path.join(out_dir, fname),
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
    manifest_lib.write_json_atomic(os.path.join(out_dir, manifest_lib.MANIFEST_NAME), manifest)
    manifest_lib.write_tfds_metadata(out_dir, manifest)
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
                channel_order: str = "RGB", **kwargs) -> dict:
    """InsightFace .rec(+.idx) -> TFRecords. Stored JPEGs decode to RGB (mxnet convention) unless told BGR."""
    plan = plan_rec(rec_path, idx_path, skip_corrupt)
    plan.params["idx"] = plan.source["idx"]
    plan.channel_order = channel_order
    return write_dataset(plan, out_dir, **kwargs)


def convert_folder(root: str, out_dir: str, *, channel_order: str = "RGB", skip_corrupt: bool = False,
                   **kwargs) -> dict:
    plan = plan_folder(root)
    plan.channel_order, plan.params["skip_corrupt"] = channel_order, skip_corrupt
    return write_dataset(plan, out_dir, **kwargs)


def convert_list(list_path: str, out_dir: str, *, root: str | None = None, channel_order: str = "RGB",
                 skip_corrupt: bool = False, **kwargs) -> dict:
    plan = plan_list(list_path, root)
    plan.channel_order, plan.params["skip_corrupt"] = channel_order, skip_corrupt
    return write_dataset(plan, out_dir, **kwargs)
