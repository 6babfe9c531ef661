"""manifest.json (our summary of a converted dataset) and the tfds metadata next to it.

The manifest records image and class counts, the class mapping (class_names[label]), the channel order of
the stored images ("RGB": a standard decoder gives RGB, the pipeline swaps to BGR; "BGR": stored swapped),
per-shard counts and sha256 checksums, the source, and skipped corrupt records.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from adaface_jax.errors import InputError

MANIFEST_NAME = "manifest.json"
FORMAT = "adaface-jax-tfrecord"


def read_manifest(data_dir: str) -> dict:
    """Reads <data_dir>/manifest.json; raises with a clear message when it is missing or malformed."""
    path = os.path.join(os.fspath(data_dir), MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {data_dir} is not a dataset written by "
                                "`adaface-jax prepare` / `adaface-jax synthesize`")
    with open(path) as f:
        try:
            manifest = json.load(f)
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
    manifest = manifest or read_manifest(data_dir)
    return [os.path.join(data_dir, shard["file"]) for shard in manifest["shards"]]


def write_tfds_metadata(data_dir: str, manifest: dict) -> None:
    """Writes dataset_info.json + features.json so tfds.builder_from_directory(data_dir) can read the shards."""

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
