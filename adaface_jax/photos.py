"""Photos -> (optionally) detected and aligned faces -> embeddings: the seed's inference path.

``embed_photos`` is what ``adaface-jax embed`` / ``adaface-jax compare`` and the notebooks call.
Alignment is ``adaface_jax.align`` (MTCNN + cp2tform, as the original ``get_aligned_face``); the
embedding is ``adaface_jax.features.extract_features`` (jitted, sharded, optional flip test).
A photo that cannot be read or has no face gives a row of NaN and its reason, never an exception.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from adaface_jax import io
from adaface_jax.align import align_faces, read_bgr
from adaface_jax.features import extract_features
from adaface_jax.io import save_npz
from evaluation.calibration import decide


@dataclasses.dataclass
class PhotoEmbeddings:
    """Embeddings of a list of photos, row i for ``sources[i]``.

    embeddings: (N, D) unit vectors (NaN rows where ``ok`` is False).
    norms: (N, 1) feature norms -- the quality indicator of the AdaFace paper (higher = better image).
    ok: (N,) bool; errors: the reason per failed photo ("" when ok).
    """

    sources: list[str]
    embeddings: np.ndarray
    norms: np.ndarray
    ok: np.ndarray
    errors: list[str]

    def similarity(self) -> np.ndarray:
        """Cosine similarity matrix ``E @ E.T`` (NaN rows/columns for failed photos)."""
        return self.embeddings @ self.embeddings.T

    def save(self, path: str) -> None:
        """An .npz (sources, embeddings, norms, ok, errors), written atomically (local or ``gs://``)."""
        save_npz(path, sources=np.asarray(self.sources), embeddings=self.embeddings, norms=self.norms,
                 ok=self.ok, errors=np.asarray(self.errors))


def read_aligned_bgr(path: str, size: int = 112) -> np.ndarray:
    """An already aligned crop (a local or ``gs://`` file) as uint8 BGR (decoded as ``cv2.imread`` does, like
    the evaluation readers)."""
    try:
        img = read_bgr(os.fspath(path), strict=True)
    except OSError as exc:  # missing, a folder, unreadable: one reason per photo, never an exception
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if img.shape[:2] != (size, size):
        raise ValueError(f"{path}: expected an aligned {size}x{size} face, got {img.shape[1]}x{img.shape[0]} "
                         "(pass --align to detect and align it first)")
    return img


def face_crops_bgr(sources: Sequence, align: bool = True, select: str = "score", size: int = 112):
    """-> (list of (size, size, 3) uint8 BGR crops or None, list of error strings)."""
    crops, errors = [], []
    if align:

        for res in align_faces(list(sources), select=select):
            crops.append(res.face_bgr if res.ok else None)
            errors.append("" if res.ok else f"{res.error}")
        return crops, errors
    for src in sources:
        try:
            crops.append(read_aligned_bgr(src, size))
            errors.append("")
        except ValueError as exc:
            crops.append(None)
            errors.append(str(exc))
    return crops, errors


def embed_photos(model, sources: Sequence, align: bool = True, flip_test: bool = False, select: str = "score",
                 batch_size: int = 64, progress: bool = False) -> PhotoEmbeddings:
    """Embed photos with a model from ``adaface_jax.load_pretrained`` (or any object with
    ``.module`` and ``.variables``).  ``align=False`` expects aligned 112x112 crops on disk."""

    names = [os.fspath(s) if isinstance(s, (str, os.PathLike)) else f"<image {i}>" for i, s in enumerate(sources)]
    crops, errors = face_crops_bgr(sources, align=align, select=select)
    ok = np.array([c is not None for c in crops], bool)
    dim = int(model.module.embedding_size)
    embeddings = np.full((len(crops), dim), np.nan, np.float32)
    norms = np.full((len(crops), 1), np.nan, np.float32)
    if ok.any():
        batch = np.stack([c for c in crops if c is not None])
        feats, nrm = extract_features(model.module, model.variables, batch, batch_size=batch_size,
                                      flip_test=flip_test, progress=progress, desc="embedding photos")
        embeddings[ok], norms[ok] = feats, nrm
    return PhotoEmbeddings(names, embeddings, norms, ok, errors)


def format_similarity(result: PhotoEmbeddings, digits: int = 4) -> str:
    """The similarity matrix as a table with short names, plus each photo's norm."""
    names = [io.basename(s) for s in result.sources]
    width = max([len(n) for n in names] + [digits + 3])
    sim = result.similarity()
    lines = [" " * width + "  " + "  ".join(n.rjust(width) for n in names) + "  " + "norm".rjust(8)]
    for i, name in enumerate(names):
        row = "  ".join(("nan" if np.isnan(v) else f"{v:.{digits}f}").rjust(width) for v in sim[i])
        norm = "nan" if np.isnan(result.norms[i, 0]) else f"{result.norms[i, 0]:.2f}"
        lines.append(name.rjust(width) + "  " + row + "  " + norm.rjust(8))
    for name, err in zip(names, result.errors):
        if err:
            lines.append(f"{name}: {err}")
    return "\n".join(lines)


def format_decisions(result: PhotoEmbeddings, calibration: dict, flip_test: bool = False) -> str:
    """Each pair's cosine with "same person at FAR=f: yes/no" for every calibrated FAR
    (``evaluation.calibration``: same iff cosine > threshold)."""

    names = [io.basename(s) for s in result.sources]
    sim = result.similarity()
    lines = [f"same-person decisions ({calibration.get('rule', 'cosine > threshold')}; calibrated on "
             f"{calibration.get('source', '?')}):"]
    if calibration.get("flip_test") is not None and bool(calibration["flip_test"]) != bool(flip_test):
        lines.append(f"  note: the thresholds were calibrated with flip_test={calibration['flip_test']}, "
                     f"these embeddings use flip_test={flip_test}")
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if not (result.ok[i] and result.ok[j]):
                continue
            verdict = ", ".join(f"same person at FAR={far}: {'yes' if same else 'no'}"
                                for far, same in decide(float(sim[i, j]), calibration).items())
            lines.append(f"  {names[i]} ~ {names[j]}: cosine {sim[i, j]:.4f}; {verdict}")
    return "\n".join(lines)
