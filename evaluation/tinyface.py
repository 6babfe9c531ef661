"""TinyFace rank-k identification (reference-behaviour §3.2), deterministic.

Layout under ``data_root``: the aligned copy ``aligned_pad_0.1_pad_high/{Probe,Gallery_Match,
Gallery_Distractor}/`` (112x112, features are extracted from these, in sorted path order) and the
raw split ``tinyface/Testing_Set/{Probe,Gallery_Match,Gallery_Distractor}/`` that defines set
membership (when absent, membership comes from the aligned folders). Files are matched by
file stem; a stem that occurs twice is an error (the reference silently keeps the last one;
``on_collision="last"`` reproduces that). Label = ``int(stem.split('_')[0])``, distractors -100.
Features stay unit vectors (not multiplied by the norm). Ranks 1, 5, 20; a probe succeeds at
rank r when ANY mate is in its top r; probes without a mate are not counted.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from evaluation import ranking

SETS = ("Probe", "Gallery_Match", "Gallery_Distractor")
EXTENSIONS = (".jpg", ".png", ".jpeg")
ALIGNED_DIR = "aligned_pad_0.1_pad_high"
RAW_DIR = os.path.join("tinyface", "Testing_Set")
RANKS = (1, 5, 20)
DISTRACTOR_LABEL = -100


def list_images(folder: str, required: bool = True) -> list[str]:
    """All image files below ``folder`` (case-insensitive extension), sorted by relative path."""
    if not os.path.isdir(folder):
        if not required:
            return []
        raise FileNotFoundError(f"TinyFace folder not found: {folder}")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for f in filenames:
            if f.lower().endswith(EXTENSIONS):
                found.append(os.path.join(dirpath, f))
    return sorted(found, key=lambda p: os.path.relpath(p, folder))


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def label_of(path: str) -> int:
    head = _stem(path).split("_")[0]
    try:
        return int(head)
    except ValueError:
        raise ValueError(f"{path}: TinyFace file names start with '<identity>_'; cannot read an integer "
                         f"identity from {head!r}") from None


@dataclasses.dataclass
class TinyFaceProtocol:
    image_paths: list          # aligned images, the feature rows, in this order
    probe_rows: np.ndarray
    probe_labels: np.ndarray
    gallery_rows: np.ndarray   # match images then distractors
    gallery_labels: np.ndarray


def build_protocol(data_root: str, aligned_dir: str = ALIGNED_DIR, raw_dir: str = RAW_DIR,
                   on_collision: str = "error") -> TinyFaceProtocol:
    """Feature order (sorted aligned files) and probe/gallery rows + labels."""
    aligned_root = os.path.join(data_root, aligned_dir)
    image_paths = []
    for s in SETS:  # a missing distractor folder is allowed (an empty set)
        image_paths += list_images(os.path.join(aligned_root, s), required=s != "Gallery_Distractor")
    row_of: dict[str, int] = {}
    for i, p in enumerate(image_paths):
        key = _stem(p)
        if key in row_of and on_collision == "error":
            raise ValueError(f"TinyFace file-stem collision: {image_paths[row_of[key]]} and {p} share the key "
                             f"{key!r} (features are matched by stem); pass on_collision='last' for the "
                             "reference's overwrite behaviour")
        row_of[key] = i
    member_root = os.path.join(data_root, raw_dir)
    if not os.path.isdir(member_root):
        member_root = aligned_root

    def rows_labels(set_name, distractor=False):
        rows, labels = [], []
        for p in list_images(os.path.join(member_root, set_name), required=not distractor):
            key = _stem(p)
            if key not in row_of:
                raise ValueError(f"{p}: no aligned image with stem {key!r} under {aligned_root}")
            rows.append(row_of[key])
            labels.append(DISTRACTOR_LABEL if distractor else label_of(p))
        return np.asarray(rows, np.int64), np.asarray(labels, np.int64)

    p_rows, p_labels = rows_labels("Probe")
    m_rows, m_labels = rows_labels("Gallery_Match")
    d_rows, d_labels = rows_labels("Gallery_Distractor", distractor=True)
    if p_rows.size == 0:
        raise ValueError(f"no probe images under {os.path.join(member_root, 'Probe')}")
    if m_rows.size + d_rows.size == 0:
        raise ValueError(f"empty gallery under {member_root}")
    return TinyFaceProtocol(image_paths, p_rows, p_labels, np.concatenate([m_rows, d_rows]),
                            np.concatenate([m_labels, d_labels]))


def evaluate(features: np.ndarray, protocol: TinyFaceProtocol, ranks=RANKS, tie: str = "stable",
             chunk: int = 4096) -> dict[int, float]:
    """Closed-set CMC: ``{rank: fraction}`` over probes with at least one mate."""
    features = np.asarray(features, np.float32)
    if features.shape[0] != len(protocol.image_paths):
        raise ValueError(f"{features.shape[0]} features but {len(protocol.image_paths)} aligned TinyFace images")
    probe = features[protocol.probe_rows]
    gallery = features[protocol.gallery_rows]
    pl, gl = protocol.probe_labels, protocol.gallery_labels
    rk, _, _ = ranking.mate_ranks_chunked(probe, gallery, lambda a, b: pl[a:b, None] == gl[None, :], tie, chunk)
    return ranking.cmc(rk, ranks)
