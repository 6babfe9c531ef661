"""Photo -> aligned 112x112 face, as AdaFace's ``face_alignment/align.get_aligned_face``.

Photos are opened with PIL and ``.convert('RGB')`` (so EXIF orientation is NOT applied,
like the original inference path); MTCNN finds faces; the highest-O-Net-score face is kept
by default; the cp2tform similarity maps its 5 landmarks onto the 112x112 template and
``cv2.warpAffine`` cuts the crop. The crop is RGB (``face_rgb``); AdaFace models take BGR,
so feed ``face_bgr`` (or reverse the channels) to the model.
"""
from __future__ import annotations

import dataclasses
import errno
import io as pyio
import os
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from adaface_jax import io
from adaface_jax.align import mtcnn, transform
from adaface_jax.errors import InputError


@dataclasses.dataclass
class AlignResult:
    """Outcome of aligning one photo.

    Attributes:
      face_rgb: (112, 112, 3) uint8 aligned crop in RGB order, or None on failure.
      landmarks: (5, 2) float32 (x, y) landmarks of the chosen face in source-photo pixels.
      box: (5,) [x1, y1, x2, y2, score] of the chosen face.
      matrix: (2, 3) warp matrix (source pixels -> crop pixels).
      error: None on success, else a message (e.g. "no face detected").
      source: the path, or a short description of an in-memory image.
      num_faces: how many faces the detector returned.
    """

    face_rgb: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    box: np.ndarray | None = None
    matrix: np.ndarray | None = None
    error: str | None = None
    source: str | None = None
    num_faces: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.face_rgb is not None

    @property
    def face_bgr(self) -> np.ndarray | None:
        """The crop in BGR order, the channel order AdaFace models expect."""
        return None if self.face_rgb is None else np.ascontiguousarray(self.face_rgb[:, :, ::-1])


def read_file_bytes(path) -> bytes:
    """A photo's bytes, local or ``gs://`` (``adaface_jax.io``); a missing file (or a folder) is an OSError
    naming it."""
    path = io.check_path(path, "image")
    if not io.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no such file" if not io.exists(path) else "is a directory", path)
    return io.read_bytes(path)


def read_bgr(path, strict: bool = False):
    """``cv2.imread(path, IMREAD_COLOR)`` for a local or ``gs://`` file: the bytes decoded with
    ``cv2.imdecode`` (which applies the EXIF orientation as imread does). None when the file cannot be read
    or decoded; with ``strict`` an OSError (missing, unreadable) or ValueError (not an image) says why."""
    try:
        data = read_file_bytes(path)
    except (OSError, InputError):
        if strict:
            raise
        return None
    buffer = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    if img is None and strict:
        raise ValueError(f"{path}: not a readable image")
    return img


def load_rgb(path) -> Image.Image:
    """Open a photo as the original inference path does: PIL ``Image.open(...).convert('RGB')`` (a local
    or ``gs://`` file)."""
    with Image.open(pyio.BytesIO(read_file_bytes(path))) as img:
        return img.convert("RGB")


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Image.Image):
        return f"<PIL image {image.mode} {image.size[0]}x{image.size[1]}>"
    return f"<array {getattr(image, 'shape', '?')}>"


class UnreadableImageError(ValueError):
    """A photo file that cannot be opened or decoded (raised only with raise_on_unreadable)."""


def _check_options(select: str, method: str) -> None:
    if select not in ("score", "largest"):
        raise ValueError(f"select must be 'score' or 'largest'; got {select!r}")
    if method not in ("cp2tform", "umeyama"):
        raise ValueError(f"method must be 'cp2tform' or 'umeyama'; got {method!r}")


def _choose(boxes: np.ndarray, select: str) -> int:
    if select == "score":
        return 0  # the detector returns the highest O-Net score first, like the original
    if select == "largest":
        areas = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
        return int(np.argmax(areas))
    raise ValueError(f"select must be 'score' or 'largest'; got {select!r}")


def align_face(
    image,
    select: str = "score",
    method: str = "cp2tform",
    *,
    size=112,
    detector: mtcnn.FaceDetector | None = None,
    raise_on_unreadable: bool = False,
) -> AlignResult:
    """Detect and align one face.

    Args:
      image: a path, a PIL image (converted to RGB) or an (H, W, 3) uint8 RGB array.
      select: "score" keeps the highest-confidence face (the original's behaviour);
        "largest" keeps the largest box.
      method: "cp2tform" (the original inference path, ``align_trans.warp_and_crop_face``) or "umeyama" (the IJB loader, ``insightface_ijb_helper/dataloader.py``).
      size: 112 or (96, 112) as (width, height).
      detector: a ``FaceDetector``; default: the shared one with AdaFace's settings.
      raise_on_unreadable: raise (naming the path) when a file cannot be opened/decoded;
        by default the failure is reported in ``AlignResult.error`` instead.

    Returns:
      ``AlignResult``; a photo without a face gives ``error="no face detected"`` and no crop,
      never an exception.
    """
    _check_options(select, method)
    source = _describe(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            image = load_rgb(image)
        except (OSError, ValueError) as exc:  # missing file, not an image, truncated data
            if raise_on_unreadable:
                raise UnreadableImageError(f"cannot read image file {source!r}: {exc}") from exc
            return AlignResult(error=f"unreadable image: {exc}", source=source)
    try:
        rgb = mtcnn.to_pil_rgb(image)
    except ValueError as exc:
        return AlignResult(error=f"invalid image: {exc}", source=source)

    boxes, landmarks = (detector or mtcnn.default_detector()).detect(rgb)
    if len(boxes) == 0:
        return AlignResult(error="no face detected", source=source)
    idx = _choose(boxes, select)
    face, matrix = transform.warp_face(np.asarray(rgb), landmarks[idx], method=method, size=size, return_matrix=True)
    return AlignResult(
        face_rgb=face, landmarks=landmarks[idx], box=boxes[idx], matrix=matrix, source=source, num_faces=len(boxes)
    )


def align_faces(
    images: Sequence,
    select: str = "score",
    method: str = "cp2tform",
    *,
    size=112,
    detector: mtcnn.FaceDetector | None = None,
    raise_on_unreadable: bool = False,
) -> list[AlignResult]:
    """``align_face`` over a list of paths / PIL images / RGB arrays (same arguments).

    One bad image never stops the batch: its result carries ``error``. The only exception
    that escapes is ``UnreadableImageError`` when ``raise_on_unreadable=True``.
    """
    _check_options(select, method)
    detector = detector or mtcnn.default_detector()
    results = []
    for image in images:
        try:
            results.append(
                align_face(image, select, method, size=size, detector=detector, raise_on_unreadable=raise_on_unreadable)
            )
        except UnreadableImageError:
            raise
        except Exception as exc:  # keep the batch alive; the message says what went wrong
            results.append(AlignResult(error=f"alignment failed: {type(exc).__name__}: {exc}", source=_describe(image)))
    return results


def iter_warped_crops(paths, landmarks, method: str = "umeyama", size: int = 112):
    """Yield ``size`` x ``size`` BGR uint8 crops of images given with their 5-point landmarks, in order
    (``read_bgr``, then ``warp_face``): the IJB loader of the original (``ImageAligner``) with
    ``method="umeyama"``. An unreadable image raises ``InputError`` naming it."""
    for path, lm in zip(paths, landmarks):
        img = read_bgr(path)
        if img is None:
            raise InputError(f"cannot read image {path} (expected a readable crop listed in the meta files)")
        yield transform.warp_face(img[:, :, :3], lm, method=method, size=size)
