"""Evaluation protocols: readers and pure-numpy scoring.

Modules (none imports TensorFlow, JAX or a model; features come in as arrays):
  verification -- the five high-quality .bin sets: 10-fold accuracy and TAR@FAR
  ijb          -- IJB-B / IJB-C: meta readers, template pooling, 1:1 ROC and 1:N
  ijbs         -- IJB-S rebuilt from the CS6 CSV files
  tinyface     -- TinyFace rank-k identification
  ranking      -- shared closed/open-set identification metrics
  plots        -- ROC / CMC PNGs (matplotlib, Agg)
The model side (``adaface_jax.evaluate``, behind the ``adaface-jax evaluate`` command) extracts features and
calls these.
"""

# How the views of an image (the image and its horizontal flip) fuse into one feature: the fusion helpers of the
# original's validation_mixed/validate_IJB_BC.py, validation_lq/validate_tinyface.py and utils.py, without
# ``faceness_score`` (which the original does not implement either). ``adaface_jax.features.fuse`` computes them.
FUSION_METHODS = ("pre_norm_vector_add", "norm_weighted_avg", "average", "concat")


class ProtocolError(ValueError):
    """Bad protocol input (a malformed meta file, inconsistent features, NaN rows): the message names
    the file, line or key and what was expected; ``adaface-jax`` prints it as one line."""
