"""Small helpers shared by the data-pipeline tests."""
import cv2
import numpy as np


def jpeg(seed: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (size, size))
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def read_tfrecord_examples(paths):
    """{index: (image bytes, label)} from shard files, parsed by TensorFlow itself."""
    import tensorflow as tf
    out = {}
    for record in tf.data.TFRecordDataset(list(paths)):
        f = tf.train.Example.FromString(record.numpy()).features.feature
        out[f["index"].int64_list.value[0]] = (f["image"].bytes_list.value[0], f["label"].int64_list.value[0])
    return out
