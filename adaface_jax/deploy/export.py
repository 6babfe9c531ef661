"""Export a model (a converted directory, a released ``.ckpt`` or a training workdir) to a PyTorch
state_dict, an ONNX model or a TensorFlow SavedModel; ``adaface-jax export`` is the command."""
from __future__ import annotations

import os

from adaface_jax.checkpoint import load_weights
from adaface_jax.convert.convert import export_state_dict, to_torch_state_dict
from adaface_jax.convert.safe_load import import_torch
from adaface_jax.deploy import onnx_export
from adaface_jax.errors import InputError
from adaface_jax.io import atomic_write, check_output_dir, check_output_file


def export_to_file(src: str, out: str, include_head: bool = True) -> int:
    """Write ``{'state_dict': ...}`` atomically; returns the number of keys."""
    torch = import_torch()
    out = check_output_file(out)
    _, variables, head, meta = load_weights(src)
    sd = export_state_dict(variables["params"], variables["batch_stats"], head if include_head else None,
                           num_batches_tracked=int(meta.get("num_batches_tracked", 0)))
    with atomic_write(out) as f:
        torch.save({"state_dict": to_torch_state_dict(sd)}, f)
    return len(sd)


def export_graph(src: str, out: str, fmt: str, *, layout: str = "NHWC", channel_order: str = "BGR",
                 dtype: str = "float32", include_norm: bool = True) -> dict:
    """ONNX or SavedModel export of a model; returns its input contract."""
    if fmt == "onnx":
        onnx_export.require_onnx()  # a missing extra is reported before any work
        check_output_file(out)
    else:
        from adaface_jax.deploy import tf_export  # noqa: PLC0415  (TensorFlow: only for SavedModels)

        out = check_output_dir(out)
        if os.path.isdir(out) and os.listdir(out):
            raise InputError(f"{out}: exists and is not empty; a SavedModel is written into a new folder")
        if not os.path.isdir(os.path.dirname(out)):
            raise InputError(f"{out}: its folder {os.path.dirname(out)} does not exist")
    arch, variables, _, meta = load_weights(src)
    kw = dict(width=int(meta.get("width", 64)), input_size=int(meta.get("input_size", [112])[0]), layout=layout,
              channel_order=channel_order, include_norm=include_norm)
    if fmt == "onnx":
        model = onnx_export.build_onnx_model(variables, arch, dtype=dtype, metadata=meta, **kw)
        onnx_export.save_onnx(model, out)
        return {p.key: p.value for p in model.metadata_props}
    if os.path.isdir(out):
        os.rmdir(out)  # empty: replaced by the finished SavedModel
    return tf_export.save_savedmodel(variables, arch, out, metadata=meta, **kw)
