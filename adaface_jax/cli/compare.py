"""``adaface-jax compare IMG... --checkpoint CKPT``: align, embed and print the similarity matrix
(the original repository's inference example), with each photo's feature norm; once the model is
calibrated (``adaface-jax calibrate``), each pair's "same person at FAR=...: yes/no". Photos and the
checkpoint may be local paths or ``gs://`` URLs."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("paths", nargs="+", help="photos (aligned first unless --no-align)")
    parser.add_argument("--checkpoint", required=True, help="a PyTorch AdaFace .ckpt or a converted/trained directory")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--no-align", dest="align", action="store_false",
                        help="the images are already aligned 112x112 crops")
    parser.add_argument("--flip-test", action="store_true")


def run(args) -> int:
    from adaface_jax.inference import load_pretrained, stored_calibration
    from adaface_jax.io import check_path
    from adaface_jax.photos import embed_photos, format_decisions, format_similarity

    checkpoint = check_path(args.checkpoint, "--checkpoint")
    for path in args.paths:
        check_path(path, "photo")
    model = load_pretrained(checkpoint, arch=args.arch)
    calibration = stored_calibration(checkpoint, model.meta)  # a damaged thresholds file fails before the work
    result = embed_photos(model, args.paths, align=args.align, flip_test=args.flip_test)
    print(format_similarity(result))
    if calibration:
        print(format_decisions(result, calibration, flip_test=args.flip_test))
    else:
        print(f"(no calibrated thresholds: `adaface-jax calibrate --checkpoint {args.checkpoint} --bin SET.bin` "
              "gives same-person decisions at target false accept rates)")
    return 0 if result.ok.all() else 1
