"""Face alignment: MTCNN 5-point detection and similarity warps to the 112x112 template.

Channel orders: detection works on RGB (photos are opened with PIL ``.convert('RGB')`` as in
the original inference path); ``warp_face`` keeps whatever channel order it is given;
``AlignResult.face_rgb`` is RGB and ``AlignResult.face_bgr`` is what AdaFace models take.
"""
from adaface_jax.align.transform import (
    IJB_REFERENCE_5PTS,
    REFERENCE_5PTS,
    estimate_matrix,
    reduce_landmarks,
    reference_points,
    similarity_cp2tform,
    similarity_umeyama,
    warp_face,
)
from adaface_jax.align.mtcnn import FaceDetector, default_detector, detect_faces
from adaface_jax.align.pipeline import (AlignResult, UnreadableImageError, align_face, align_faces, iter_warped_crops,
                                       load_rgb, read_bgr)

__all__ = [
    "IJB_REFERENCE_5PTS",
    "REFERENCE_5PTS",
    "AlignResult",
    "FaceDetector",
    "UnreadableImageError",
    "align_face",
    "align_faces",
    "default_detector",
    "detect_faces",
    "estimate_matrix",
    "iter_warped_crops",
    "load_rgb",
    "read_bgr",
    "reduce_landmarks",
    "reference_points",
    "similarity_cp2tform",
    "similarity_umeyama",
    "warp_face",
]
