"""5-point similarity transforms and the 112x112 face warp used by AdaFace.

Two estimators exist in the original code base and both are kept here:

* ``similarity_umeyama``: scikit-image's Umeyama fit (landmarks -> template), used by
  the IJB alignment (``validation_mixed/insightface_ijb_helper/dataloader.py``, ``ImageAligner``).
* ``similarity_cp2tform``: the MATLAB ``cp2tform``-style fit of the inference path
  (``align_trans.get_similarity_transform_for_cv2``). It fits template -> landmarks
  in source-pixel units and inverts, so with noisy landmarks it differs slightly from
  Umeyama; for noise-free points the two agree.

Both return a (2, 3) matrix ``M`` in OpenCV's convention: ``[u, v]^T = M @ [x, y, 1]^T``
maps a source-image point (x, y) to the aligned-crop point (u, v). Points are always
(x, y) = (column, row) pixel coordinates.
"""
from __future__ import annotations

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

# ArcFace 5-point template for 112x112 crops: the 96x112 template shifted by +8 px in x.
# These are the precise values of the inference path (``align_trans``); the IJB path (``ImageAligner``) writes the
# same points rounded to 4 decimals. Cast to float32 as both original paths do, the two forms
# agree to float32 precision (max difference ~1e-6 px). Order: left eye, right eye, nose tip,
# left mouth corner, right mouth corner (left/right as seen in the image).
REFERENCE_5PTS = np.array(
    [
        [38.29459953, 51.69630051],
        [73.53179932, 51.50139999],
        [56.02519989, 71.73660278],
        [41.54930115, 92.3655014],
        [70.72990036, 92.20410156],
    ],
    dtype=np.float32,
)

# The IJB loader (``ImageAligner``) builds its template from the 4-decimal 96x112 points in float32 and adds
# 8 in float32; that differs from REFERENCE_5PTS by up to ~8e-6 px, enough to flip a few pixel
# values of a warp by 1, so the Umeyama (IJB) path uses exactly this form.
IJB_REFERENCE_5PTS = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
    dtype=np.float32,
)
IJB_REFERENCE_5PTS[:, 0] += np.float32(8.0)

# 96x112 crops use the template without the +8 px shift (the only other size the original allows).
_REFERENCE_96x112 = REFERENCE_5PTS - np.array([8.0, 0.0], dtype=np.float32)


def reference_points(size=112, method: str = "cp2tform") -> np.ndarray:
    """The float32 (5, 2) template for an output crop of ``size``.

    Args:
      size: 112 (square 112x112 crop) or (96, 112) given as (width, height).
      method: "umeyama" gives the IJB loader's float32 form of the 112x112 template (``ImageAligner``),
        "cp2tform" the inference path's (``align_trans``).
    """
    if size in (112, (112, 112)):
        return (IJB_REFERENCE_5PTS if method == "umeyama" else REFERENCE_5PTS).copy()
    if tuple(np.atleast_1d(size)) == (96, 112):
        return _REFERENCE_96x112.copy()
    raise ValueError(f"crop size must be 112, (112, 112) or (96, 112) as (width, height); got {size!r}")


def _crop_wh(size) -> tuple[int, int]:
    if np.isscalar(size):
        return int(size), int(size)
    w, h = size
    return int(w), int(h)


def reduce_landmarks(landmarks) -> np.ndarray:
    """Return (5, 2) float32 landmarks; 68-point (iBUG) input is reduced as the IJB loader does.

    68 -> 5: mean of points 36 and 39 (left eye), mean of 42 and 45 (right eye), point 30
    (nose tip), 48 and 54 (mouth corners). Any (5, 2) input is returned as float32.
    """
    pts = np.asarray(landmarks, dtype=np.float32)
    if pts.ndim == 1 and pts.size in (10, 136):
        pts = pts.reshape(-1, 2)
    if pts.shape == (5, 2):
        return pts
    if pts.shape == (68, 2):
        return np.stack(
            [
                pts[[36, 39]].mean(axis=0),
                pts[[42, 45]].mean(axis=0),
                pts[30],
                pts[48],
                pts[54],
            ]
        ).astype(np.float32)
    raise ValueError(f"landmarks must have shape (5, 2) or (68, 2) as (x, y) points; got {pts.shape}")


def _check_points(src_pts, dst_pts):
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise ValueError(f"expected two (N, 2) point arrays of equal shape; got {src.shape} and {dst.shape}")
    return src, dst


def similarity_umeyama(src_pts, dst_pts) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src -> dst.

    scikit-image's ``SimilarityTransform.from_estimate`` (Umeyama 1991, no reflection): it
    minimises the squared error in *dst* space. Used by the IJB alignment with
    src = detected landmarks and dst = ``REFERENCE_5PTS``.

    Returns:
      (2, 3) float64 matrix M for ``cv2.warpAffine`` (maps src pixel coords to dst coords).
    """
    src, dst = _check_points(src_pts, dst_pts)
    tform = SimilarityTransform.from_estimate(src, dst)
    if not tform:
        raise ValueError(f"similarity estimation failed for the given points: {tform}")
    return np.asarray(tform.params[:2, :], dtype=np.float64)


def _fit_nonreflective(uv: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """cp2tform's non-reflective fit; returns the 3x3 row-vector matrix T mapping uv -> xy.

    Solves, by least squares, u = sc*x + ss*y + tx and v = -ss*x + sc*y + ty (xy -> uv, in
    uv units), builds Tinv = [[sc, -ss, 0], [ss, sc, 0], [tx, ty, 1]] and inverts it.
    float32 casts mirror the original, which ran on float32 points (numpy's lstsq/inv compute
    in float64 and return float32).
    """
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    design = np.concatenate(
        [np.stack([x, y, ones, zeros], axis=1), np.stack([y, -x, zeros, ones], axis=1)], axis=0
    )
    target = np.concatenate([uv[:, 0], uv[:, 1]]).astype(np.float64)
    if np.linalg.matrix_rank(design) < 4:
        raise ValueError("cp2tform needs at least 2 distinct point pairs (design matrix rank < 4)")
    sc, ss, tx, ty = np.linalg.lstsq(design, target, rcond=None)[0].astype(np.float32)
    t_inv = np.array([[sc, -ss, 0.0], [ss, sc, 0.0], [tx, ty, 1.0]], dtype=np.float32)
    t = np.linalg.inv(t_inv.astype(np.float64)).astype(np.float32)
    t[:, 2] = np.array([0.0, 0.0, 1.0], dtype=np.float32)
    return t


def _apply_rowvec(t: np.ndarray, pts: np.ndarray) -> np.ndarray:
    homog = np.concatenate([pts, np.ones((len(pts), 1), dtype=pts.dtype)], axis=1)
    return (homog @ t)[:, :2]


def similarity_cp2tform(
    src_pts, dst_pts, *, reflective: bool = True, replicate_reflection_bug: bool = True
) -> np.ndarray:
    """MATLAB ``cp2tform('similarity')``-style fit of AdaFace's inference alignment (``matlab_cp2tform``).

    Fits dst -> src by least squares in src units, inverts it to get src -> dst. With
    ``reflective=True`` (the original's default through the misspelled 'smilarity' type) a
    reflective candidate is also fitted (dst with x negated, composed with diag(-1, 1, 1)), and
    the candidate with the smaller Frobenius residual wins; ties go to the non-reflective one.

    Args:
      src_pts: (N, 2) detected landmarks (x, y) in source-image pixels.
      dst_pts: (N, 2) template points (x, y) in crop pixels, e.g. ``REFERENCE_5PTS``.
      reflective: also consider the mirrored fit.
      replicate_reflection_bug: the original negates the reference array in place before the
        residuals are measured, so both residuals are taken against (-x, y). True reproduces
        that (parity); False measures them against the true reference.

    Returns:
      (2, 3) float32 matrix M for ``cv2.warpAffine`` (maps src pixel coords to dst coords).
    """
    src64, dst64 = _check_points(src_pts, dst_pts)
    uv = src64.astype(np.float32)
    xy = dst64.astype(np.float32)
    t1 = _fit_nonreflective(uv, xy)
    t = t1
    if reflective:
        xy_mirrored = xy.copy()
        xy_mirrored[:, 0] = -xy_mirrored[:, 0]
        t2 = _fit_nonreflective(uv, xy_mirrored) @ np.diag([-1.0, 1.0, 1.0]).astype(np.float32)
        residual_ref = xy_mirrored if replicate_reflection_bug else xy
        norm1 = np.linalg.norm(_apply_rowvec(t1, uv) - residual_ref)
        norm2 = np.linalg.norm(_apply_rowvec(t2, uv) - residual_ref)
        t = t1 if norm1 <= norm2 else t2
    return np.ascontiguousarray(t[:, 0:2].T)


_ESTIMATORS = {"umeyama": similarity_umeyama, "cp2tform": similarity_cp2tform}


def estimate_matrix(landmarks, method: str = "umeyama", size=112) -> np.ndarray:
    """(2, 3) matrix mapping image landmarks (5 or 68 points) onto the template for ``size``."""
    if method not in _ESTIMATORS:
        raise ValueError(f"unknown alignment method {method!r}; expected one of {sorted(_ESTIMATORS)}")
    return _ESTIMATORS[method](reduce_landmarks(landmarks), reference_points(size, method))


def warp_face(image, landmarks, method: str = "umeyama", size=112, *, return_matrix: bool = False):
    """Align a face: similarity fit of the landmarks to the template, then ``cv2.warpAffine``.

    Args:
      image: (H, W, C) or (H, W) uint8 array in any channel order (RGB or BGR); the output keeps
        the input's channel order, since the warp treats channels independently.
      landmarks: (5, 2) or (68, 2) (x, y) points in ``image`` pixel coordinates.
      method: "umeyama" (the IJB loader) or "cp2tform" (the MTCNN inference path).
      size: 112 for 112x112, or (96, 112) as (width, height).
      return_matrix: also return the (2, 3) matrix.

    Returns:
      The aligned uint8 crop, (h, w, C) with the input's channel order (and M if asked). The warp
      is bilinear (INTER_LINEAR) with a constant 0 border, as in both original paths.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"warp_face expects a uint8 image; got dtype {img.dtype}")
    if img.ndim not in (2, 3):
        raise ValueError(f"warp_face expects an (H, W) or (H, W, C) image; got shape {img.shape}")
    matrix = estimate_matrix(landmarks, method, size)
    out = cv2.warpAffine(
        np.ascontiguousarray(img),
        matrix.astype(np.float64),
        _crop_wh(size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    if img.ndim == 3 and out.ndim == 2:  # cv2 drops a single channel axis
        out = out[:, :, None]
    return (out, matrix) if return_matrix else out
