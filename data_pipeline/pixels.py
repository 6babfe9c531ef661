"""The model's input pixels: the one normalisation from uint8 to the float the backbone takes.

The original maps a uint8 pixel ``p`` to ``(p/255 - 0.5)/0.5`` in float32, in [-1, 1] (its training and
evaluation transforms, torchvision ``ToTensor`` then ``Normalize(0.5, 0.5)``; AdaFace README: channels in BGR
order). Here it is computed as ``p / 127.5 - 1`` in float32: for each of the 256 values this gives the same
bits as the original's three steps, with one operation fewer. The original's ``inference.to_input`` computes
the same formula in float64 and then casts, which differs by at most 2**-24 (6e-8) on half the values.

Under ``jax.jit`` XLA compiles the division by the constant into a multiplication by its float32
reciprocal, so values computed on the device may differ by up to 2**-23 (1.2e-7); host-side results
(numpy, TensorFlow) are exact.

``normalize_pixels`` takes numpy or JAX arrays (the model side, traced inside jit too) and
``normalize_pixels_tf`` TensorFlow tensors (the tf.data input pipeline); both use the constants below.
"""
from __future__ import annotations

import numpy as np

# p -> p / PIXEL_SCALE - PIXEL_OFFSET
PIXEL_SCALE = 127.5
PIXEL_OFFSET = 1.0


def normalize_pixels(images):
    """uint8 images (numpy or JAX, any shape) -> float32 ``p / 127.5 - 1``. Float input is taken as already
    normalised and returned as float32 unchanged."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / PIXEL_SCALE - PIXEL_OFFSET
    return images.astype(np.float32)


def normalize_pixels_tf(images_uint8):
    """uint8 TensorFlow tensor -> float32 ``p / 127.5 - 1``: the same bits as ``normalize_pixels``."""
    import tensorflow as tf  # noqa: PLC0415  (this module is imported by the model side, which needs no TF)

    return tf.cast(images_uint8, tf.float32) / PIXEL_SCALE - PIXEL_OFFSET
