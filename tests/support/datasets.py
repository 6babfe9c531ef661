"""Small image folders (clean or with damaged files), a small prepared dataset, a shard rewritten as another tool
would write it, a `prepare` that kills itself mid-shard, and readers of a prepared folder that do not go through
`data_pipeline`."""
import json
import os

import cv2
import numpy as np

from data_pipeline import prepare
from data_pipeline.manifest import read_manifest
from data_pipeline.tfrecord import make_example, write_tfrecord_atomic
from tests.support.data_fixtures import jpeg, read_tfrecord_examples


def small_jpeg(seed: int, size: int = 16) -> bytes:
    """A ``size``-pixel JPEG of smooth random colours, a different image for each seed."""
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), (size, size))
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def truncated(data: bytes) -> bytes:
    """A JPEG cut after its headers and part of the scan (starts like a JPEG; only decoding finds it)."""
    return data[: len(data) * 2 // 3]


def image_folder(root, classes=3, per_class=3, damage=None) -> dict:
    """root/<class>/<i>.jpg; damage: {(class, i): bytes transform}. Returns {(class, i): stored bytes}."""
    stored = {}
    for c in range(classes):
        os.makedirs(os.path.join(root, str(c)), exist_ok=True)
        for i in range(per_class):
            data = small_jpeg(10 * c + i)
            if damage and (c, i) in damage:
                data = damage[(c, i)](data)
            with open(os.path.join(root, str(c), f"{i}.jpg"), "wb") as f:
                f.write(data)
            stored[(c, i)] = data
    return stored


def images(folder, names, size=16, seed=0):
    """The JPEGs ``names`` in ``folder``, a different image each."""
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(names):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(jpeg(seed + k, size))


def identities(root, classes=3, per_class=2):
    """``root``/id<c>/<i>.jpg: ``classes`` identities of ``per_class`` images; returns ``root`` as a string."""
    for c in range(classes):
        images(os.path.join(root, f"id{c}"), [f"{i}.jpg" for i in range(per_class)], seed=10 * c)
    return str(root)


def write_small_dataset(tmp_path) -> str:
    """4 identities x 4 JPEGs under ``tmp_path/src``, prepared into 2 shards in ``tmp_path/ds`` (returned)."""
    image_folder(tmp_path / "src", classes=4, per_class=4)
    out = str(tmp_path / "ds")
    prepare.convert_folder(str(tmp_path / "src"), out, num_workers=0, num_shards=2, show_progress=False)
    return out


def rewrite_shard(data_dir, shard, edit):
    """Rewrites one shard with edit(list of (image, label, index)) -> list, keeping the manifest consistent
    (as a dataset written by another tool would be)."""
    manifest = read_manifest(data_dir)
    path = os.path.join(data_dir, manifest["shards"][shard]["file"])
    import tensorflow as tf
    records = []
    for raw in tf.data.TFRecordDataset(path):
        f = tf.train.Example.FromString(raw.numpy()).features.feature
        records.append((f["image"].bytes_list.value[0], f["label"].int64_list.value[0], f["index"].int64_list.value[0]))
    records = edit(records)
    count, size, digest = write_tfrecord_atomic(path, (make_example(*r) for r in records))
    manifest["shards"][shard].update(num_images=count, num_bytes=size, sha256=digest)
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return records


# `adaface-jax ARGS` in a child that SIGKILLs itself (no cleanup, no exception handler runs) in the middle of
# the shard after the first KEEP finished ones, as a kill -9 or a preempted machine would.
KILLED_CHILD = """
import os, signal, sys
from adaface_jax.cli import main
from data_pipeline import prepare
keep = int(sys.argv[1])
started = []
real_write, real_examples = prepare._write_task, prepare._examples
def write_task(task):
    started.append(task["path"])
    return real_write(task)
def examples(task, stats):
    for i, example in enumerate(real_examples(task, stats)):
        if len(started) > keep and i == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        yield example
prepare._write_task, prepare._examples = write_task, examples
sys.exit(main(sys.argv[2:]))
"""


def manifest_json(out):
    """manifest.json as plain JSON (no validation by the code under test)."""
    return json.loads((out / "manifest.json").read_text())


def stored_examples(out):
    """{index: (image bytes, label)} of every shard the manifest lists, parsed by TensorFlow."""
    m = manifest_json(out)
    return read_tfrecord_examples([os.path.join(out, s["file"]) for s in m["shards"]])
