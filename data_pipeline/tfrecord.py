"""The on-disk record format shared by all converters and the input pipeline.

One tf.train.Example per image: 'image' (encoded bytes exactly as stored in the source), 'label' (int64),
'index' (int64 position in the source) and, for synthetic data, 'quality' (float32 in [0, 1]).
Examples are serialized here without TensorFlow (protobuf wire format by hand: it is tiny and fast); only
the TFRecord framing, which needs CRC32C, uses tf.io.TFRecordWriter.
"""
from __future__ import annotations

import hashlib
import struct

import tensorflow as tf

from adaface_jax import io

IMAGE_KEY, LABEL_KEY, INDEX_KEY, QUALITY_KEY = "image", "label", "index", "quality"


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 negatives are 10-byte two's complement varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = 0x0A, 0x12, 0x1A  # Feature oneof fields 1, 2, 3 (length-delimited)


def _feature_entry(key: str, kind: int, packed: bytes) -> bytes:
    feature = _len_field(kind, _len_field(0x0A, packed)) if kind != _BYTES_LIST else \
        _len_field(kind, packed)
    entry = _len_field(0x0A, key.encode()) + _len_field(0x12, feature)
    return _len_field(0x0A, entry)


def make_example(image: bytes, label: int, index: int, quality: float | None = None) -> bytes:
    """Serialized tf.train.Example {image, label, index[, quality]}."""
    entries = [
        _feature_entry(IMAGE_KEY, _BYTES_LIST, _len_field(0x0A, bytes(image))),
        _feature_entry(LABEL_KEY, _INT64_LIST, _varint(int(label))),
        _feature_entry(INDEX_KEY, _INT64_LIST, _varint(int(index))),
    ]
    if quality is not None:
        entries.append(_feature_entry(QUALITY_KEY, _FLOAT_LIST, struct.pack("<f", float(quality))))
    return _len_field(0x0A, b"".join(entries))


def shard_filename(name: str, shard: int, num_shards: int) -> str:
    """tfds naming ({DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}), so builder_from_directory finds them."""
    return f"{name}-train.tfrecord-{shard:05d}-of-{num_shards:05d}"


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with io.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_tfrecord_atomic(path: str, serialized_examples) -> tuple[int, int, str]:
    """Writes examples to `path` (local or gs://) through a local temporary file, renamed over it or uploaded
    once to it when complete (``adaface_jax.io.atomic_path``); returns (count, num_bytes, sha256)."""

    count = 0
    with io.atomic_path(path) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            for example in serialized_examples:
                writer.write(example)
                count += 1
        digest, size = file_sha256(tmp), io.getsize(tmp)
    return count, size, digest


def parse_features(with_quality: bool = False) -> dict:
    """tf.io.parse_single_example spec for the record format."""

    spec = {IMAGE_KEY: tf.io.FixedLenFeature([], tf.string), LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
            INDEX_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1)}
    if with_quality:
        spec[QUALITY_KEY] = tf.io.FixedLenFeature([], tf.float32, default_value=-1.0)
    return spec
