"""Evaluation protocols: readers and pure-numpy scoring.

Modules (none imports TensorFlow or runs a model):
  verification -- the five high-quality .bin sets: 10-fold accuracy and TAR@FAR (§1)
  ijb          -- IJB-B / IJB-C: meta readers, template pooling, 1:1 ROC and 1:N (§2)
  ijbs         -- IJB-S rebuilt from the CS6 CSV files (§3.1)
  tinyface     -- TinyFace rank-k identification (§3.2)
  ranking      -- shared closed/open-set identification metrics
  plots        -- ROC / CMC PNGs (matplotlib, Agg)
  cli          -- ``adaface-jax evaluate``
Section numbers refer to ../shared/spec/reference-behaviour.md.
"""
