"""The model-input normalisation (data_pipeline.pixels) against the original's transforms, computed by torch."""
import jax
import numpy as np
import tensorflow as tf
import torch

from adaface_jax.inference import to_input
from data_pipeline.pixels import normalize_pixels, normalize_pixels_tf

ALL_VALUES = np.arange(256, dtype=np.uint8)


def original_transform(pixels: np.ndarray) -> np.ndarray:
    """The original's training/evaluation transform: torchvision ToTensor (float32 / 255) then Normalize(0.5, 0.5)."""
    return torch.from_numpy(pixels).to(torch.float32).div(255).sub(0.5).div(0.5).numpy()


def bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).view(np.int32)  # compares signs of zero too


def test_numpy_and_tensorflow_give_the_original_bits_for_every_pixel_value():
    want = original_transform(ALL_VALUES)
    ours_np = normalize_pixels(ALL_VALUES)
    ours_tf = normalize_pixels_tf(tf.constant(ALL_VALUES)).numpy()
    assert ours_np.dtype == ours_tf.dtype == np.float32
    np.testing.assert_array_equal(bits(ours_np), bits(want))
    np.testing.assert_array_equal(bits(ours_tf), bits(want))
    assert ours_np[0] == -1.0 and ours_np[255] == 1.0


def test_numpy_and_tensorflow_agree_bit_for_bit_on_random_images():
    images = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(bits(normalize_pixels(images)),
                                  bits(normalize_pixels_tf(tf.constant(images)).numpy()))


def test_jitted_and_float64_forms_stay_within_float32_rounding():
    """Inside jit XLA multiplies by the reciprocal; the original's inference.to_input works in float64."""
    want = original_transform(ALL_VALUES)
    on_device = np.asarray(jax.jit(normalize_pixels)(ALL_VALUES))
    np.testing.assert_allclose(on_device, want, rtol=0, atol=2.0 ** -23)  # one float32 ulp of 1.0
    rgb = np.resize(ALL_VALUES, (112, 112, 3))  # every value, in each channel
    original_to_input = ((rgb[:, :, ::-1].astype(np.float64) / 255.0 - 0.5) / 0.5).astype(np.float32)[None]
    np.testing.assert_allclose(to_input(rgb), original_to_input, rtol=0, atol=2.0 ** -24)


def test_float_input_is_taken_as_already_normalised():
    x = np.linspace(-1, 1, 12, dtype=np.float64).reshape(2, 2, 3)
    out = normalize_pixels(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float32))
