"""Pretrained AdaFace models in a few lines::

    from adaface_jax.inference import load_pretrained, to_input
    model = load_pretrained("adaface_ir50_ms1mv2.ckpt")      # or a converted directory
    emb, norm = model.embed(to_input(aligned_rgb_face))       # (1, 512) unit vectors, (1, 1) norms

Inputs of ``embed`` are NHWC **BGR** images, uint8 or float32 normalised as ``(x/255 - 0.5)/0.5``
(``data_pipeline.pixels``): what ``to_input`` makes from an aligned RGB face, like the original
``inference.to_input`` but NHWC.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adaface_jax.features import extract_features
from adaface_jax.models import build_model
from adaface_jax.weights import calibration_file, load_weights
from data_pipeline.pixels import normalize_pixels


def to_input(img, size: int = 112) -> np.ndarray:
    """Aligned RGB face (uint8 array (H, W, 3) or PIL image) -> float32 BGR model input (1, H, W, 3).
    The original computes the normalisation in float64; the float32 values here differ from its by at most
    2**-24 (``data_pipeline.pixels``)."""
    if hasattr(img, "convert") and hasattr(img, "size"):  # PIL.Image
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"to_input expects an RGB image of shape (H, W, 3), got {arr.shape}")
    if arr.shape[:2] != (size, size):
        raise ValueError(f"to_input expects an aligned {size}x{size} face, got {arr.shape[0]}x{arr.shape[1]} "
                         "(align it first, e.g. with adaface_jax.align)")
    if arr.dtype != np.uint8:
        raise ValueError(f"to_input expects uint8 pixels in [0, 255], got dtype {arr.dtype}")
    return normalize_pixels(arr[:, :, ::-1])[None]


@dataclasses.dataclass
class PretrainedModel:
    """A backbone with its weights. ``embed(x)`` -> numpy ``(embeddings (N, 512), norms (N, 1))``."""

    arch: str
    variables: dict
    meta: dict
    module: Any
    head: Optional[dict] = None
    batch_size: int = 64

    def __post_init__(self):
        self.variables = jax.tree_util.tree_map(jnp.asarray, self.variables)

    @property
    def input_size(self) -> int:
        return int(self.module.input_size)

    def embed(self, x, flip_test: bool = False):
        """Embed NHWC BGR images -- float32 normalised (``to_input``) or uint8 -- in fixed-size
        batches.  ``flip_test`` adds the width-flipped view, fused with
        ``pre_norm_vector_add`` (the original evaluation scripts' default fusion)."""
        x = np.asarray(x)
        if x.dtype != np.uint8:
            x = x.astype(np.float32)
        if x.ndim == 3:
            x = x[None]
        s = self.input_size
        if x.ndim != 4 or x.shape[1:] != (s, s, 3):
            raise ValueError(f"embed expects (N, {s}, {s}, 3) BGR images (normalised float or uint8), "
                             f"got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self.module.embedding_size), np.float32), np.zeros((0, 1), np.float32)
        # The one extraction path (adaface_jax.features): jitted once per model and flip setting,
        # sharded over local devices, last batch padded.

        return extract_features(self.module, self.variables, x, batch_size=min(self.batch_size, x.shape[0]),
                                flip_test=flip_test, progress=False)

    __call__ = embed


def stored_calibration(model_path: str, meta: dict) -> Optional[dict]:
    """The calibrated thresholds stored with a model (``meta['calibration']`` as ``load_weights`` returns
    it), checked: a stored file of the wrong structure is an error naming the file and the key
    (``evaluation.calibration.check_calibration``). None when the model is not calibrated."""
    from evaluation.calibration import check_calibration  # noqa: PLC0415

    calibration = meta.get("calibration")
    if calibration is None:
        return None
    return check_calibration(calibration, str(calibration_file(model_path)))


def load_pretrained(path: str, arch: Optional[str] = None, dtype=jnp.float32,
                    batch_size: int = 64) -> PretrainedModel:
    """A released/Lightning ``.ckpt`` (converted on the fly, safely), a converted directory, or one
    of our training workdirs (its latest checkpoint)."""

    arch, variables, head, meta = load_weights(path, arch)
    input_size = int(meta.get("input_size", [112])[0])
    module = build_model(arch, input_size=input_size, dtype=dtype, width=int(meta.get("width", 64)))
    return PretrainedModel(arch=arch, variables=variables, meta=meta, module=module, head=head,
                           batch_size=batch_size)
