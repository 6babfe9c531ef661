"""manifest.json (our summary of a converted dataset) and the tfds metadata next to it.

The manifest records image and class counts, the class mapping (class_names[label]), the channel order of
the stored images ("RGB": a standard decoder gives RGB, the pipeline swaps to BGR; "BGR": stored swapped),
per-shard counts and sha256 checksums, the source, and skipped corrupt records and files.

The manifest is the marker of a finished dataset: it is written LAST (after every shard and the tfds
metadata), and a conversion that is about to change a finished dataset removes it FIRST. A folder without
one is refused by `adaface-jax check` and by the training input, naming what is missing; a folder holding
an unfinished conversion (PROGRESS_DIR/SOURCE_FILE) is named as such.
"""
from __future__ import annotations

import json

import numpy as np

from adaface_jax import io
from adaface_jax.errors import InputError

MANIFEST_NAME = "manifest.json"
FORMAT = "adaface-jax-tfrecord"
PROGRESS_DIR = ".progress"  # a conversion's progress records, one per finished shard
SOURCE_FILE = "source.json"  # in PROGRESS_DIR: the source an unfinished conversion is writing
TFDS_FILES = ("dataset_info.json", "features.json", "label.labels.txt")  # tfds metadata


class MissingManifestError(InputError, FileNotFoundError):
    """The folder holds no manifest.json: not a dataset, or a conversion that has not finished. An
    InputError (one line in the CLI) and a FileNotFoundError (what callers caught before)."""


def _unfinished(data_dir: str) -> str | None:
    """A description of the unfinished conversion in data_dir, or None when there is none."""
    try:
        record = json.loads(io.read_text(io.join(data_dir, PROGRESS_DIR, SOURCE_FILE)))
    except (OSError, ValueError):
        return None
    source = record.get("source") if isinstance(record, dict) else None
    what = f"{source.get('kind')} {source.get('path')}" if isinstance(source, dict) and source.get("path") else \
        ("synthetic data" if isinstance(source, dict) and source.get("kind") == "synthetic" else "a source")
    done = len(io.glob(io.join(data_dir, PROGRESS_DIR), "*.tfrecord-*.json"))
    return f"{what} ({done} shard(s) finished so far)"


def read_manifest(data_dir: str) -> dict:
    """Reads <data_dir>/manifest.json; raises (InputError) with a clear message when the folder or its manifest
    is missing, when a conversion into it has not finished, or when the manifest is malformed."""
    data_dir = io.check_path(data_dir, "dataset folder")
    path = io.join(data_dir, MANIFEST_NAME)
    if not io.isfile(path):
        if not io.isdir(data_dir):
            raise MissingManifestError(f"dataset folder {data_dir} " + (
                "is not a folder" if io.exists(data_dir) else "does not exist"))
        unfinished = _unfinished(data_dir)
        if unfinished is not None:
            raise MissingManifestError(
                f"{path} not found: {data_dir} holds an unfinished conversion of {unfinished} (interrupted, or "
                "still running); rerun the same `adaface-jax prepare`/`synthesize` command to finish it")
        raise MissingManifestError(f"{path} not found: {data_dir} is not a dataset written by "
                                   "`adaface-jax prepare` / `adaface-jax synthesize`")
    try:
        manifest = json.loads(io.read_text(path))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{path}: not valid JSON ({err}); rerun `adaface-jax prepare` to rewrite it") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in ("num_images", "num_classes", "channel_order", "class_names", "shards")
               if k not in manifest]
    if manifest.get("format") != FORMAT or missing:
        raise InputError(f"{path}: not an {FORMAT} manifest (format={manifest.get('format')!r}, missing {missing})")
    for i, shard in enumerate(manifest["shards"] if isinstance(manifest["shards"], list) else [None]):
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or \
                not isinstance(shard.get("num_images"), int):
            raise InputError(f"{path}: shards[{i}] is {shard!r}; expected {{'file': name, 'num_images': int, ...}}")
    return manifest


def shard_paths(data_dir: str, manifest: dict | None = None) -> list[str]:
    data_dir = io.check_path(data_dir, "dataset folder")
    manifest = manifest or read_manifest(data_dir)
    return [io.join(data_dir, shard["file"]) for shard in manifest["shards"]]


def write_tfds_metadata(data_dir: str, manifest: dict) -> None:
    """Writes dataset_info.json + features.json so tfds.builder_from_directory(data_dir) can read the shards
    (tfds writes through etils.epath: a gs:// folder works too)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415  (slow to import; only the converter needs it)

    features = {"image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=[str(n) for n in manifest["class_names"]]),
                "index": tfds.features.Scalar(np.int64)}
    if manifest.get("has_quality"):
        features["quality"] = tfds.features.Scalar(np.float32)
    name = manifest["name"]
    identity = tfds.core.dataset_info.DatasetIdentity(name=name, version="1.0.0", data_dir=data_dir,
                                                      module_name="data_pipeline")
    info = tfds.core.DatasetInfo(
        builder=identity, features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label"),
        description=(f"Face images converted by adaface-jax from {manifest['source'].get('kind')}; stored channel "
                     f"order {manifest['channel_order']} (the training pipeline feeds BGR)."))
    template = tfds.core.ShardedFileTemplate(data_dir=data_dir, dataset_name=name, split="train",
                                             filetype_suffix="tfrecord")
    info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
        name="train", shard_lengths=[s["num_images"] for s in manifest["shards"]],
        num_bytes=sum(s["num_bytes"] for s in manifest["shards"]), filename_template=template)]))
    info.write_to_directory(data_dir)
