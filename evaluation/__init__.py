"""Evaluation protocols: readers and pure-numpy scoring.

Modules (none imports TensorFlow, JAX or a model; features come in as arrays):
  verification -- the five high-quality .bin sets: 10-fold accuracy and TAR@FAR
  ijb          -- IJB-B / IJB-C: meta readers, template pooling, 1:1 ROC and 1:N
  ijbs         -- IJB-S rebuilt from the CS6 CSV files
  tinyface     -- TinyFace rank-k identification
  ranking      -- shared closed/open-set identification metrics
  plots        -- ROC / CMC PNGs (matplotlib, Agg)
The ``adaface-jax evaluate`` command (adaface_jax/cli/evaluate.py) extracts features and calls these.
"""


class ProtocolError(ValueError):
    """Bad protocol input (a malformed meta file, inconsistent features, NaN rows): the message names
    the file, line or key and what was expected; ``adaface-jax`` prints it as one line."""
