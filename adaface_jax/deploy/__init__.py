"""Deployment: the IResNet as a portable graph (ONNX, TensorFlow SavedModel) or a PyTorch state_dict.

* ``graph.walk_iresnet`` walks the architecture once over the converted weights and asks an *emitter*
  for each operation; ``onnx_export`` and ``tf_export`` are the two emitters.
* ``export`` picks the format from the output's name and writes it atomically (``adaface-jax export``).

Calibrated same-person thresholds (``evaluation.calibration``, stored with the weights) are carried into
an exported model's metadata.

The input contract of every exported model (stated in its metadata): NHWC (or NCHW), 112x112, BGR
(or RGB), float32 ``(x/255 - 0.5)/0.5``; outputs ``embedding`` (unit vectors) and ``norm`` (the
quality indicator of the AdaFace paper) unless exported with ``include_norm=False``.
"""
