"""InsightFace validation `.bin` reader (pickle of (encoded images, issame)) without code execution.

The file is a pickle, so it is read with an unpickler that resolves only the few numpy globals needed to
rebuild uint8/bool arrays; anything else (os.system, eval, ...) is refused before it can run.
Images are decoded with cv2.imdecode(IMREAD_COLOR), which yields BGR, the order the model expects.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from typing import Any

import cv2
import numpy as np
from numpy._core.multiarray import _reconstruct, scalar
from numpy._core.numeric import _frombuffer

from adaface_jax.errors import InputError
from adaface_jax.io import atomic_write, save_npy, write_json

IMAGE_SIZE = 112

# (module, name) pairs the unpickler may resolve: numpy's array reconstruction in numpy 1.x and 2.x.
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_ALLOWED_DTYPES = (np.dtype(np.uint8), np.dtype(np.bool_))


class UnsafePickleError(pickle.UnpicklingError, InputError):
    """The pickle asked for something other than bytes, lists, bools or uint8/bool numpy arrays."""


def _checked_dtype(spec, *args):
    dtype = np.dtype(spec)
    if dtype not in _ALLOWED_DTYPES:
        raise UnsafePickleError(f"numpy dtype {dtype} is not allowed (only uint8 and bool)")
    return np.dtype(spec, *args)


def _checked_scalar(dtype, *args):
    if np.dtype(dtype) not in _ALLOWED_DTYPES:
        raise UnsafePickleError(f"numpy scalar of dtype {dtype} is not allowed")
    return scalar(dtype, *args)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module, name):
        if (module, name) not in _ARRAY_GLOBALS:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global {module}.{name}; a .bin may only hold bytes, "
                "lists/tuples, bools and uint8/bool numpy arrays")
        if name == "dtype":
            return _checked_dtype
        if name == "scalar":
            return _checked_scalar
        if name == "ndarray":
            return np.ndarray
        if name == "_reconstruct":
            return _reconstruct
        return _frombuffer


def safe_unpickle_bin(path: str) -> tuple[list, np.ndarray]:
    """Returns (list of encoded images as bytes-like, issame bool array) from a .bin file, safely."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            payload = _RestrictedUnpickler(io.BufferedReader(f), path).load()
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001  (anything a damaged or foreign file makes pickle raise)
            size = os.path.getsize(path)
            raise InputError(f"{path}: not a .bin verification set: it is not a readable pickle ({size} bytes; "
                             f"{type(err).__name__}: {err}); expected pickle((list of encoded images, list of "
                             "bools))") from None
    if not isinstance(payload, (tuple, list)) or len(payload) != 2:
        raise InputError(f"{path}: expected a pickled 2-tuple (bins, issame_list), got {type(payload).__name__}"
                         + (f" of length {len(payload)}" if isinstance(payload, (tuple, list)) else ""))
    bins, issame = payload
    if isinstance(bins, np.ndarray) and bins.dtype == np.uint8 and bins.ndim == 2:
        bins = list(bins)
    if not isinstance(bins, (list, tuple)):
        raise InputError(f"{path}: expected a list of encoded images, got {type(bins).__name__}")
    issame = np.asarray(issame)
    if issame.dtype != np.bool_:
        if issame.size and not np.isin(issame, (0, 1)).all():
            raise InputError(f"{path}: issame_list must hold bools, got dtype {issame.dtype}")
        issame = issame.astype(bool)
    issame = issame.reshape(-1)
    if len(bins) != 2 * len(issame):
        raise InputError(f"{path}: {len(bins)} images but {len(issame)} pairs; expected 2 images per pair")
    return list(bins), issame


def _as_buffer(element: Any, path: str, index: int) -> np.ndarray:
    if isinstance(element, (bytes, bytearray, memoryview)):
        return np.frombuffer(element, dtype=np.uint8)
    if isinstance(element, np.ndarray) and element.dtype == np.uint8 and element.size == max(element.shape, default=0):
        return element.reshape(-1)  # InsightFace's own files hold (n,) or (n, 1) uint8 arrays
    raise InputError(f"{path}: element {index} is {type(element).__name__}"
                     f"{'' if not isinstance(element, np.ndarray) else f' {element.dtype}{element.shape}'}; "
                     "expected encoded image bytes (bytes, bytearray or a 1-D/(n,1) uint8 array)")


def decode_bin_images(bins: list, path: str = "<bins>", image_size: int | None = IMAGE_SIZE) -> np.ndarray:
    """Decodes encoded images to a uint8 BGR array (n, H, W, 3); raises naming the element on failure."""
    images = None
    for index, element in enumerate(bins):
        buffer = _as_buffer(element, path, index)
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None  # cv2 asserts on 0 bytes
        if image is None:
            raise InputError(f"{path}: element {index} is not a decodable image "
                             f"({len(element)} bytes, starts with {bytes(element[:8])!r})")
        if images is None:
            shape = image.shape if image_size is None else (image_size, image_size, 3)
            images = np.empty((len(bins),) + tuple(shape), np.uint8)
        if image.shape != images.shape[1:]:
            raise InputError(f"{path}: element {index} decodes to shape {image.shape}, expected {images.shape[1:]}")
        images[index] = image
    if images is None:
        images = np.empty((0, image_size or IMAGE_SIZE, image_size or IMAGE_SIZE, 3), np.uint8)
    return images


def _cache_key(path: str) -> str:
    stat = os.stat(path)
    ident = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def load_bin(path: str, cache_dir: str | None = None, image_size: int | None = IMAGE_SIZE
             ) -> tuple[np.ndarray, np.ndarray]:
    """Loads an InsightFace .bin verification set.

    Args:
      path: the .bin file (pickle of (list of JPEG/PNG bytes, list of bools), as InsightFace writes them).
      cache_dir: if given, decoded images are cached there as `<name>.<key>.images.npy` (+ issame) and
        later calls return a read-only np.memmap instead of decoding again. The key covers path, size
        and mtime, so a changed .bin is decoded afresh.
      image_size: expected side (112); None accepts any single size.
    Returns:
      images uint8 BGR (2N, H, W, 3) and issame bool (N,); pair i is images 2i and 2i+1.
    """
    path = os.fspath(path)
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        stem = os.path.join(cache_dir, f"{os.path.splitext(os.path.basename(path))[0]}.{_cache_key(path)}")
        images_file, issame_file = stem + ".images.npy", stem + ".issame.npy"
        if os.path.exists(images_file) and os.path.exists(issame_file):
            return np.load(images_file, mmap_mode="r"), np.load(issame_file)
    bins, issame = safe_unpickle_bin(path)
    images = decode_bin_images(bins, path, image_size)
    if cache_dir is not None:
        save_npy(issame_file, issame)
        save_npy(images_file, images)
        write_json(stem + ".json", {"source": os.path.abspath(path), "num_pairs": int(len(issame))})
        return np.load(images_file, mmap_mode="r"), issame
    return images, issame


def write_bin(path: str, encoded_images: list[bytes], issame: list[bool] | np.ndarray) -> None:
    """Writes a .bin in the InsightFace layout (pickle protocol 4 of (list of bytes, list of bools)), atomically."""
    if len(encoded_images) != 2 * len(issame):
        raise ValueError(f"write_bin: {len(encoded_images)} images for {len(issame)} pairs (need 2 per pair)")
    with atomic_write(path) as f:
        pickle.dump(([bytes(b) for b in encoded_images], [bool(s) for s in issame]), f, protocol=4)
