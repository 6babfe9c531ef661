"""``adaface-jax export SRC OUT [--format torch|onnx|savedmodel]``: a converted directory, a released
``.ckpt`` or a training workdir -> a PyTorch ``{'state_dict': ...}`` (loads into the original net.py
with ``strict=True``), an ONNX model or a TensorFlow SavedModel (see ``adaface_jax.deploy``)."""
from __future__ import annotations

import os

FORMATS = ("torch", "onnx", "savedmodel")


def add_arguments(parser):
    parser.add_argument("src_dir", help="a converted directory (`adaface-jax convert`), a released .ckpt or a training "
                                        "workdir (its latest checkpoint; padded classifier columns are dropped)")
    parser.add_argument("out", help="output: .ckpt (torch), .onnx file (onnx) or a new folder (savedmodel)")
    parser.add_argument("--format", choices=FORMATS, default="torch")
    parser.add_argument("--no-head", action="store_true", help="torch: write the backbone only")
    parser.add_argument("--layout", choices=("NHWC", "NCHW"), default="NHWC",
                        help="onnx/savedmodel input layout (default NHWC, as the JAX model)")
    parser.add_argument("--channel-order", choices=("BGR", "RGB"), default="BGR",
                        help="onnx/savedmodel input channel order (default BGR, as AdaFace; RGB bakes the swap in)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="onnx compute precision (float16: half weights and compute, float32 input/outputs)")
    parser.add_argument("--no-norm", action="store_true", help="onnx/savedmodel: output the embedding only")


def check_options(args) -> None:
    """Refuse option combinations that mean nothing for the chosen format (one line each)."""
    from adaface_jax.errors import InputError

    if args.format == "torch":
        for flag, used in (("--layout", args.layout != "NHWC"), ("--channel-order", args.channel_order != "BGR"),
                           ("--dtype", args.dtype != "float32"), ("--no-norm", args.no_norm)):
            if used:
                raise InputError(f"{flag} applies to --format onnx/savedmodel, not torch (a state_dict has no input "
                                 "contract)")
    else:
        if args.no_head:
            raise InputError(f"--no-head applies to --format torch; {args.format} exports the backbone only")
        if args.format == "savedmodel" and args.dtype != "float32":
            raise InputError("--dtype float16 is for --format onnx; a SavedModel is float32 (convert it with TFLite's "
                             "float16 quantization instead)")


def export_to_file(src: str, out: str, include_head: bool = True) -> int:
    """Write ``{'state_dict': ...}`` atomically; returns the number of keys."""
    import torch

    from adaface_jax.checkpoint import load_weights
    from adaface_jax.convert.convert import export_state_dict, to_torch_state_dict
    from adaface_jax.io import atomic_write, check_output_file

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
    from adaface_jax.checkpoint import load_weights
    from adaface_jax.errors import InputError
    from adaface_jax.io import check_output_dir, check_output_file

    if fmt == "onnx":
        from adaface_jax.deploy import onnx_export

        onnx_export._require_onnx()  # a missing extra is reported before any work
        check_output_file(out)
    else:
        from adaface_jax.deploy import tf_export

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


def run(args) -> int:
    check_options(args)
    if args.format == "torch":
        n = export_to_file(args.src_dir, args.out, include_head=not args.no_head)
        print(f"exported {args.src_dir} -> {args.out} ({n} keys)")
        return 0
    contract = export_graph(args.src_dir, args.out, args.format, layout=args.layout, channel_order=args.channel_order,
                            dtype=args.dtype, include_norm=not args.no_norm)
    print(f"exported {args.src_dir} -> {args.out} ({args.format}, {contract['compute_dtype']}): input "
          f"{contract['input_shape']} {contract['channel_order']} float32 {contract['normalization']}; outputs "
          f"{contract['outputs']}")
    return 0
