"""InsightFace validation `.bin` reader (pickle of (encoded images, issame)) without code execution.

The file is a pickle, so it is read with an unpickler that resolves only the few numpy globals needed to
rebuild uint8/bool arrays; anything else (os.system, eval, ...) is refused before it can run.
Images are decoded with cv2.imdecode(IMREAD_COLOR), which yields BGR, the order the model expects.
The .bin and the decoded cache may be local or on gs:// (``adaface_jax.io``); a local cache is memory-mapped,
a remote one is read into memory.
"""
from __future__ import annotations

import hashlib
import io as _stdio
import os
import pickle
from typing import Any

import cv2
import numpy as np
from numpy._core.multiarray import _reconstruct, scalar
from numpy._core.numeric import _frombuffer

from adaface_jax import io
from adaface_jax.errors import InputError

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
    path = io.check_path(path, ".bin")
    with (io.open(path, "rb") if not io.is_remote(path) else _stdio.BytesIO(io.read_bytes(path))) as f:
        try:
            payload = _RestrictedUnpickler(_stdio.BufferedReader(f) if not io.is_remote(path) else f, path).load()
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001  (anything a damaged or foreign file makes pickle raise)
            size = io.getsize(path)
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
    size, mtime_ns = io.file_info(path)
    ident = f"{io.check_path(path)}|{size}|{mtime_ns}"
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
    path = io.check_path(path, ".bin")
    if cache_dir is not None:
        cache_dir = io.check_output_dir(cache_dir, "cache folder")
        if not io.isfile(path):  # before the cache folder is created
            raise FileNotFoundError(2, "No such file or directory", path)
        stem = io.join(cache_dir, f"{os.path.splitext(io.basename(path))[0]}.{_cache_key(path)}")
        images_file, issame_file, meta_file = stem + ".images.npy", stem + ".issame.npy", stem + ".json"
        for out, suffix in ((images_file, ".npy"), (issame_file, ".npy"), (meta_file, ".json")):
            if io.exists(out):  # a name of ours in a folder of someone else's files: replace only an earlier cache
                io.check_output_file(out, "cache file", suffixes=(suffix,))
        if io.isfile(images_file) and io.isfile(issame_file):
            return _load_npy(images_file), _load_npy(issame_file, mmap=False)
    bins, issame = safe_unpickle_bin(path)
    images = decode_bin_images(bins, path, image_size)
    if cache_dir is not None:
        io.makedirs(cache_dir)
        io.save_npy(issame_file, issame)
        io.save_npy(images_file, images)
        io.write_json(meta_file, {"source": path, "num_pairs": int(len(issame))})  # the cache's marker, last
        return _load_npy(images_file), issame
    return images, issame


def _load_npy(path: str, mmap: bool = True) -> np.ndarray:
    """A cached array: memory-mapped read-only from a local disk, read into memory from gs://."""
    if io.is_remote(path):
        return np.load(io.readable(path))
    return np.load(path, mmap_mode="r" if mmap else None)


def write_bin(path: str, encoded_images: list[bytes], issame: list[bool] | np.ndarray) -> None:
    """Writes a .bin in the InsightFace layout (pickle protocol 4 of (list of bytes, list of bools)), atomically."""
    if len(encoded_images) != 2 * len(issame):
        raise ValueError(f"write_bin: {len(encoded_images)} images for {len(issame)} pairs (need 2 per pair)")
    with io.atomic_write(path) as f:
        pickle.dump(([bytes(b) for b in encoded_images], [bool(s) for s in issame]), f, protocol=4)
