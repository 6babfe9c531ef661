"""Data pipeline for adaface-jax: RecordIO, converters to TFRecord shards, .bin reader, tf.data input,
augmentations and a synthetic identity dataset. Imports no model code (and TensorFlow only where needed)."""
