"""Data pipeline for adaface-jax: RecordIO, dataset preparation into TFRecord shards (``prepare``), .bin reader,
tf.data input, the model-input pixel normalisation (``pixels``), augmentations and a synthetic identity dataset.
Imports no model code (and TensorFlow only where needed)."""
