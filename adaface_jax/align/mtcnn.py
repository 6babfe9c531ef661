"""MTCNN face detection with 5 landmarks, following AdaFace's own procedure.

This replicates the original inference detector (face_alignment/mtcnn.py on the
TropComplique MTCNN port: face_alignment/mtcnn.py and mtcnn_pytorch/src/*) step by step, on the weights of the
``mtcnn`` wheel (see ``nets.py``): Pillow BILINEAR resizes for the pyramid and the crops,
P-Net's width-axis softmax quirk (optional, on by default), ceil-mode pooling, +1 box areas,
strict ``>`` suppression, 'min' NMS in the last stage, calibrate / square / round between
stages, zero-filled out-of-image crop parts.

All images here are RGB (as PIL ``.convert('RGB')`` gives them). Boxes are
[x1, y1, x2, y2, score] in pixels (inclusive corners) and landmarks are (x, y) points in the
order left eye, right eye, nose, left mouth corner, right mouth corner.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from adaface_jax.align import nets


# ----------------------------------------------------------------------------- box helpers


def nms(boxes: np.ndarray, threshold: float, mode: str = "union") -> list[int]:
    """Greedy NMS as in the original: highest score first, +1 areas, suppress ``overlap > thr``.

    Args:
      boxes: (N, >=5) [x1, y1, x2, y2, score, ...].
      mode: "union" (IoU) or "min" (intersection over the smaller area).
    Returns:
      kept indices, highest score first.
    """
    if len(boxes) == 0:
        return []
    x1, y1, x2, y2, score = (boxes[:, i] for i in range(5))
    area = (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    order = np.argsort(score)  # ascending; the default (quicksort) kind, as the original
    keep = []
    while len(order) > 0:
        best, rest = order[-1], order[:-1]
        keep.append(int(best))
        iw = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1.0)
        ih = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1.0)
        inter = iw * ih
        if mode == "min":
            overlap = inter / np.minimum(area[best], area[rest])
        elif mode == "union":
            overlap = inter / (area[best] + area[rest] - inter)
        else:
            raise ValueError(f"unknown NMS mode {mode!r}; expected 'union' or 'min'")
        order = rest[~(overlap > threshold)]
    return keep


def calibrate(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply regression offsets (tx1, ty1, tx2, ty2), scaled by the +1 box width/height."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    out[:, 0:4] = boxes[:, 0:4] + np.stack([w, h, w, h], axis=1) * offsets
    return out


def square(boxes: np.ndarray) -> np.ndarray:
    """Centred square boxes of side max(w, h). Like the original, the score column is zeroed
    (every later stage writes its own score before using it)."""
    out = np.zeros_like(boxes)
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side - 1.0
    out[:, 3] = out[:, 1] + side - 1.0
    return out


def _square_and_round(boxes: np.ndarray) -> np.ndarray:
    out = square(boxes)
    out[:, 0:4] = np.round(out[:, 0:4])
    return out


def crop_boxes(image: Image.Image, boxes: np.ndarray, size: int, clip_in_place: bool = True) -> np.ndarray:
    """Cut each box out of the RGB image, zero-filling the parts outside it, resize to size x size
    with Pillow BILINEAR, and preprocess. Returns (N, size, size, 3) float32.

    The original's ``correct_bboxes`` clips the box coordinates *in place* while computing the
    crop (its x/y/ex/ey are views of the box array), so later stages see boxes clipped to the
    image; ``clip_in_place=True`` reproduces that on ``boxes``.
    """
    rgb = np.asarray(image, dtype=np.uint8)
    height, width = rgb.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.float32)
    x1, y1, x2, y2 = (boxes[:, i].copy() for i in range(4))
    w = (x2 - x1 + 1.0).astype(np.int32)
    h = (y2 - y1 + 1.0).astype(np.int32)
    cx1, cy1 = np.maximum(x1, 0.0), np.maximum(y1, 0.0)
    cx2, cy2 = np.minimum(x2, width - 1.0), np.minimum(y2, height - 1.0)
    for i in range(len(boxes)):
        patch = np.zeros((max(h[i], 1), max(w[i], 1), 3), dtype=np.uint8)
        sx0, sy0, sx1, sy1 = int(cx1[i]), int(cy1[i]), int(cx2[i]), int(cy2[i])
        if sx1 >= sx0 and sy1 >= sy0:  # some part of the box lies inside the image
            dx0, dy0 = int(cx1[i] - x1[i]), int(cy1[i] - y1[i])
            region = rgb[sy0 : sy1 + 1, sx0 : sx1 + 1]
            region = region[: patch.shape[0] - dy0, : patch.shape[1] - dx0]
            patch[dy0 : dy0 + region.shape[0], dx0 : dx0 + region.shape[1]] = region
        resized = Image.fromarray(patch).resize((size, size), Image.BILINEAR)
        out[i] = nets.preprocess(np.asarray(resized))
    if clip_in_place:
        boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = cx1, cy1, cx2, cy2
    return out


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """Scales m*factor^k while the shorter side, scaled by m = 12/min_face_size, stays > 12."""
    m = 12.0 / min_face_size
    length = min(height, width) * m
    scales = []
    k = 0
    while length > 12:
        scales.append(m * factor**k)
        length *= factor
        k += 1
    return scales


# ----------------------------------------------------------------------------- detector


class FaceDetector:
    """AdaFace's MTCNN (min face 20 px, thresholds 0.6/0.7/0.9, NMS 0.7, pyramid factor 0.85).

    Args:
      weights: ``nets.MTCNNWeights``; default loads the ``mtcnn`` wheel's weights.
      min_face_size, thresholds, nms_thresholds, factor: the original's parameters.
      pnet_width_softmax: replicate AdaFace's P-Net softmax over the width axis (parity with the
        original's crops); False uses the per-cell class softmax of upstream MTCNN.
      clip_boxes_in_place: replicate the original's in-place clipping of boxes to the image
        when crops are cut (affects faces touching the border only).
    """

    def __init__(
        self,
        weights: nets.MTCNNWeights | None = None,
        *,
        min_face_size: float = 20.0,
        thresholds=(0.6, 0.7, 0.9),
        nms_thresholds=(0.7, 0.7, 0.7),
        factor: float = 0.85,
        pnet_width_softmax: bool = True,
        clip_boxes_in_place: bool = True,
    ):
        self.weights = weights if weights is not None else nets.load_weights()
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.nms_thresholds = tuple(float(t) for t in nms_thresholds)
        self.factor = float(factor)
        self.pnet_width_softmax = pnet_width_softmax
        self.clip_boxes_in_place = clip_boxes_in_place

    # Stage 1 on one pyramid level: candidate boxes (K, 9) [x1, y1, x2, y2, score, tx1, ty1, tx2, ty2].
    def _pnet_level(self, image: Image.Image, scale: float) -> np.ndarray:
        width, height = image.size
        resized = image.resize((math.ceil(width * scale), math.ceil(height * scale)), Image.BILINEAR)
        x = nets.preprocess(np.asarray(resized))[None]
        if x.shape[1] < 12 or x.shape[2] < 12:
            return np.zeros((0, 9))
        prob, offsets = nets.pnet_forward(self.weights.pnet, x, self.pnet_width_softmax)
        rows, cols = np.where(prob > self.thresholds[0])
        if rows.size == 0:
            return np.zeros((0, 9))
        stride, cell = 2, 12
        boxes = np.stack(
            [
                np.round((stride * cols + 1.0) / scale),
                np.round((stride * rows + 1.0) / scale),
                np.round((stride * cols + 1.0 + cell) / scale),
                np.round((stride * rows + 1.0 + cell) / scale),
                prob[rows, cols],
                *(offsets[rows, cols, i] for i in range(4)),
            ],
            axis=1,
        )
        return boxes[nms(boxes[:, 0:5], 0.5)]

    def detect(self, image) -> tuple[np.ndarray, np.ndarray]:
        """Detect faces in an RGB image.

        Args:
          image: PIL image (converted to RGB) or (H, W, 3) uint8 RGB array ((H, W) grey is
            replicated to 3 channels).
        Returns:
          boxes (K, 5) float64 [x1, y1, x2, y2, O-Net score] and landmarks (K, 5, 2) float32
          (x, y), highest O-Net score first; K may be 0.
        """
        image = to_pil_rgb(image)
        empty = (np.zeros((0, 5)), np.zeros((0, 5, 2), np.float32))
        width, height = image.size

        # Stage 1: P-Net over the pyramid.
        levels = [self._pnet_level(image, s) for s in pyramid_scales(height, width, self.min_face_size, self.factor)]
        boxes = np.concatenate([np.zeros((0, 9))] + levels, axis=0)
        if len(boxes) == 0:
            return empty
        boxes = boxes[nms(boxes[:, 0:5], self.nms_thresholds[0])]
        boxes = _square_and_round(calibrate(boxes[:, 0:5], boxes[:, 5:9]))

        # Stage 2: R-Net on 24x24 crops.
        crops = crop_boxes(image, boxes, 24, self.clip_boxes_in_place)
        prob, offsets = nets.rnet_forward(self.weights.rnet, crops)
        keep = np.where(prob > self.thresholds[1])[0]
        boxes, offsets = boxes[keep], offsets[keep]
        boxes[:, 4] = prob[keep]
        keep = nms(boxes, self.nms_thresholds[1])
        boxes = _square_and_round(calibrate(boxes[keep], offsets[keep]))
        if len(boxes) == 0:
            return empty

        # Stage 3: O-Net on 48x48 crops; landmarks are relative to the (clipped) square box.
        crops = crop_boxes(image, boxes, 48, self.clip_boxes_in_place)
        prob, offsets, rel_landmarks = nets.onet_forward(self.weights.onet, crops)
        keep = np.where(prob > self.thresholds[2])[0]
        boxes, offsets, rel_landmarks = boxes[keep], offsets[keep], rel_landmarks[keep]
        boxes[:, 4] = prob[keep]
        w = boxes[:, 2] - boxes[:, 0] + 1.0
        h = boxes[:, 3] - boxes[:, 1] + 1.0
        # float32 like the original (its landmark array comes from the network output).
        lm_x = (boxes[:, 0:1] + w[:, None] * rel_landmarks[:, 0:5]).astype(np.float32)
        lm_y = (boxes[:, 1:2] + h[:, None] * rel_landmarks[:, 5:10]).astype(np.float32)
        boxes = calibrate(boxes, offsets)
        keep = nms(boxes, self.nms_thresholds[2], mode="min")
        if len(keep) == 0:
            return empty
        landmarks = np.stack([lm_x[keep], lm_y[keep]], axis=-1)
        return boxes[keep], landmarks

    __call__ = detect


def to_pil_rgb(image) -> Image.Image:
    """PIL image -> ``.convert('RGB')``; (H, W, 3) uint8 array (RGB) or (H, W) grey -> PIL RGB."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image array; got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB or (H, W) grey image array; got shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


_DEFAULT_DETECTOR: FaceDetector | None = None


def default_detector() -> FaceDetector:
    """A process-wide detector with the original's settings (weights loaded on first use)."""
    global _DEFAULT_DETECTOR
    if _DEFAULT_DETECTOR is None:
        _DEFAULT_DETECTOR = FaceDetector()
    return _DEFAULT_DETECTOR


def detect_faces(rgb, detector: FaceDetector | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Detect faces in an RGB uint8 image (or PIL image) with AdaFace's MTCNN settings.

    Returns boxes (K, 5) [x1, y1, x2, y2, score] and landmarks (K, 5, 2) (x, y), highest
    O-Net score first.
    """
    return (detector or default_detector()).detect(rgb)
