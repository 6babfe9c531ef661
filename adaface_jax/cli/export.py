"""``adaface-jax export SRC OUT [--format torch|onnx|savedmodel]``: a converted directory, a released
``.ckpt`` or a training workdir -> a PyTorch ``{'state_dict': ...}`` (loads into the original net.py
with ``strict=True``), an ONNX model or a TensorFlow SavedModel (see ``adaface_jax.deploy``).

Without ``--format`` the format is OUT's suffix: ``.ckpt``/``.pt``/``.pth`` torch, ``.onnx`` onnx (a
SavedModel folder needs ``--format savedmodel``); a ``--format`` that contradicts the suffix is refused.
SRC and OUT may be local paths or ``gs://`` URLs."""
from __future__ import annotations

FORMATS = ("torch", "onnx", "savedmodel")


def add_arguments(parser):
    parser.add_argument("src_dir", help="a converted directory (`adaface-jax convert`), a released .ckpt or a training "
                                        "workdir (its latest checkpoint; padded classifier columns are dropped)")
    parser.add_argument("out", help="output: .ckpt/.pt/.pth (torch), .onnx file (onnx) or a new folder (savedmodel)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="default: from OUT's suffix (.ckpt/.pt/.pth torch, .onnx onnx)")
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


def run(args) -> int:
    from adaface_jax.deploy.export import export_graph, export_to_file, format_of
    from adaface_jax.io import check_path

    check_path(args.src_dir, "SRC")
    args.format = format_of(args.out, args.format)
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
