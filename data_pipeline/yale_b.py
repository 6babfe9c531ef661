"""The cropped Extended Yale B faces as arrays, with the light direction of each image as its quality.

Layout (Georghiades et al. 2001; Lee et al. 2005, "CroppedYale"): ``<root>/yaleBNN/yaleBNN_P00A+035E-20.jpg``
(or .pgm), one folder per subject, about 64 images each, 168x192 greyscale, frontal pose, roughly aligned.
Only the illumination changes: ``A`` is the light's azimuth and ``E`` its elevation in degrees, relative
to the camera axis. The angle theta between the light and the camera axis has ``cos(theta) = cos(A) cos(E)``;
we use ``quality = cos(theta)``: 1 for frontal light, about 0 for light from the side, negative for light
from behind the face plane (the darkest, most shadowed images). Files whose name carries no light
direction (the ``_Ambient`` images of the full database) are skipped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np

from adaface_jax import io
from adaface_jax.errors import InputError

NAME = re.compile(r"^(yaleB\d+)_P00A([+-]\d{3})E([+-]\d{2})\.(jpe?g|pgm|png)$", re.IGNORECASE)


@dataclass(frozen=True)
class YaleB:
    """images: uint8 BGR (N, size, size, 3) (three equal channels); labels: subject index in sorted order
    of ``subjects``; azimuth/elevation: degrees; quality: cos of the light's angle to the camera axis;
    files: paths relative to the root."""

    images: np.ndarray
    labels: np.ndarray
    azimuth: np.ndarray
    elevation: np.ndarray
    quality: np.ndarray
    subjects: tuple
    files: tuple


def light_quality(azimuth_deg, elevation_deg) -> np.ndarray:
    """cos(angle between the light and the camera axis) = cos(A) cos(E)."""
    return np.cos(np.radians(azimuth_deg)) * np.cos(np.radians(elevation_deg))


def parse_name(name: str):
    """``'yaleB01_P00A+035E-20.jpg'`` -> ('yaleB01', 35, -20); None for a name without a light direction."""
    m = NAME.match(name)
    if not m:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3))


def to_square(image_grey: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop of a (H, W) greyscale face, resized (area interpolation) to size x size BGR."""
    h, w = image_grey.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image_grey[top:top + side, left:left + side]
    resized = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    return np.repeat(resized[:, :, None], 3, axis=2)


def load_yale_b(root: str, size: int = 112) -> YaleB:
    """Every image of the cropped Extended Yale B folder ``root`` (local or gs://; see the module docstring)."""
    root = io.check_path(root, "Yale B folder")
    if not io.isdir(root):
        raise InputError(f"{root}: not a folder; expected the cropped Extended Yale B root "
                         "(yaleBNN/yaleBNN_P00A+000E+00.jpg ...)")
    entries = []
    for sub in io.scandir(root)[0]:
        folder = io.join(root, sub)
        for name in io.scandir(folder)[1]:
            parsed = parse_name(name)
            if parsed is None:
                continue
            subject, az, el = parsed
            if subject.lower() != sub.lower():
                raise InputError(f"{sub}/{name}: file of subject {subject} in folder {sub}")
            entries.append((sub, f"{sub}/{name}", az, el))
    subjects = tuple(sorted({e[0] for e in entries}))
    if len(subjects) < 2:
        raise InputError(f"{root}: found {len(subjects)} subject folder(s) with yaleBNN_P00A±aaaE±ee images; "
                         "expected the cropped Extended Yale B layout with at least 2 subjects")
    index = {s: i for i, s in enumerate(subjects)}
    images = np.empty((len(entries), size, size, 3), np.uint8)
    for k, (_, rel, _, _) in enumerate(entries):
        path = io.join(root, *rel.split("/"))
        data = np.frombuffer(io.read_bytes(path), np.uint8)
        grey = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None  # cv2 asserts on 0 bytes
        if grey is None or grey.size == 0:
            raise InputError(f"{path}: not a decodable image (expected a 168x192 greyscale face)")
        images[k] = to_square(grey, size)
    az = np.array([e[2] for e in entries], np.float32)
    el = np.array([e[3] for e in entries], np.float32)
    if np.any(np.abs(az) > 180) or np.any(np.abs(el) > 90):
        bad = next(e[1] for e in entries if abs(e[2]) > 180 or abs(e[3]) > 90)
        raise InputError(f"{io.join(root, *bad.split('/'))}: light direction out of range (|A| <= 180, |E| <= 90)")
    return YaleB(images=images, labels=np.array([index[e[0]] for e in entries], np.int32), azimuth=az,
                 elevation=el, quality=light_quality(az, el).astype(np.float32), subjects=subjects,
                 files=tuple(e[1] for e in entries))


def light_angle_deg(quality) -> np.ndarray:
    """The light's angle to the camera axis in degrees, from ``quality = cos(angle)``."""
    return np.degrees(np.arccos(np.clip(np.asarray(quality, np.float64), -1.0, 1.0)))


__all__ = ["YaleB", "light_angle_deg", "light_quality", "load_yale_b", "parse_name", "to_square"]
