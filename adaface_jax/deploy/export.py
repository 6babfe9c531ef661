"""Export a model (a converted directory, a released ``.ckpt`` or a training workdir) to a PyTorch
state_dict, an ONNX model or a TensorFlow SavedModel; ``adaface-jax export`` is the command. Sources and
outputs may be local or in a bucket (``gs://``); every output is written atomically (a SavedModel folder
is built locally and copied in, its ``saved_model.pb`` last)."""
from __future__ import annotations

from adaface_jax import io
from adaface_jax.convert.convert import export_state_dict, to_torch_state_dict
from adaface_jax.convert.safe_load import import_torch
from adaface_jax.deploy import onnx_export
from adaface_jax.errors import InputError
from adaface_jax.weights import load_weights

# The file names each format writes (a SavedModel is a folder)
SUFFIXES = {"torch": (".ckpt", ".pt", ".pth"), "onnx": (".onnx",)}


def suffix_of(path: str) -> str:
    """The lower-case extension of a path's last name ('' when it has none)."""
    name = io.basename(path)
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def format_of(out: str, fmt: str | None) -> str:
    """The export format: ``fmt`` when given (refused when ``out``'s suffix names another format), else the one
    ``out``'s suffix names (.ckpt/.pt/.pth torch, .onnx onnx); a name without a known suffix needs ``fmt``."""
    out = io.check_path(out, "OUT")
    suffix = suffix_of(out)
    implied = next((f for f, suffixes in SUFFIXES.items() if suffix in suffixes), None)
    if fmt is None:
        if implied is not None:
            return implied
        if io.isdir(out):
            raise InputError(f"OUT {out}: is a directory; pass --format savedmodel to write a SavedModel into a new "
                             "folder, or name a .ckpt (torch) or .onnx file")
        raise InputError(f"OUT {out}: cannot tell the format from the name (expected .ckpt, .pt or .pth for torch, "
                         ".onnx for onnx); pass --format, e.g. --format savedmodel for a folder")
    if implied is not None and implied != fmt:
        raise InputError(f"--format {fmt} contradicts OUT {out}: a {suffix} file is the {implied} format; pass "
                         f"--format {implied} or name the output for {fmt}")
    return fmt


def _check_not_source(src: str, out: str) -> None:
    if io.check_path(src) == out:
        raise InputError(f"OUT {out}: is the model being exported; choose another name")


def export_to_file(src: str, out: str, include_head: bool = True) -> int:
    """Write ``{'state_dict': ...}`` atomically; returns the number of keys."""
    torch = import_torch()
    out = io.check_output_file(out, "OUT", suffixes=SUFFIXES["torch"])
    _check_not_source(src, out)
    _, variables, head, meta = load_weights(src)
    sd = export_state_dict(variables["params"], variables["batch_stats"], head if include_head else None,
                           num_batches_tracked=int(meta.get("num_batches_tracked", 0)))
    with io.atomic_write(out) as f:
        torch.save({"state_dict": to_torch_state_dict(sd)}, f)
    return len(sd)


def export_graph(src: str, out: str, fmt: str, *, layout: str = "NHWC", channel_order: str = "BGR",
                 dtype: str = "float32", include_norm: bool = True) -> dict:
    """ONNX or SavedModel export of a model; returns its input contract."""
    from adaface_jax.inference import stored_calibration  # noqa: PLC0415

    if fmt == "onnx":
        onnx_export.require_onnx()  # a missing extra is reported before any work
        out = io.check_output_file(out, "OUT", suffixes=SUFFIXES["onnx"])
        _check_not_source(src, out)
    else:
        from adaface_jax.deploy import tf_export  # noqa: PLC0415  (TensorFlow: only for SavedModels)

        out = io.check_creatable_dir(out, "OUT")
        if io.isdir(out) and io.listdir(out):
            raise InputError(f"OUT {out}: exists and is not empty; a SavedModel is written into a new folder")
    arch, variables, _, meta = load_weights(src)
    stored_calibration(src, meta)  # carried into the metadata: a damaged thresholds file is refused
    kw = dict(width=int(meta.get("width", 64)), input_size=int(meta.get("input_size", [112])[0]), layout=layout,
              channel_order=channel_order, include_norm=include_norm)
    if fmt == "onnx":
        model = onnx_export.build_onnx_model(variables, arch, dtype=dtype, metadata=meta, **kw)
        onnx_export.save_onnx(model, out)
        return {p.key: p.value for p in model.metadata_props}
    return tf_export.save_savedmodel(variables, arch, out, metadata=meta, **kw)
