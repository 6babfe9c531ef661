"""Deployment: the IResNet as a portable graph (ONNX, TensorFlow SavedModel) and calibrated
same-person thresholds.

* ``graph.walk_iresnet`` walks the architecture once over the converted weights and asks an *emitter*
  for each operation; ``onnx_export`` and ``tf_export`` are the two emitters.
* ``calibration`` turns a verification set into cosine thresholds at target false accept rates.

The input contract of every exported model (stated in its metadata): NHWC (or NCHW), 112x112, BGR
(or RGB), float32 ``(x/255 - 0.5)/0.5``; outputs ``embedding`` (unit vectors) and ``norm`` (the
quality indicator of the AdaFace paper) unless exported with ``include_norm=False``.
"""
