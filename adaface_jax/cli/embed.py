"""``adaface-jax embed PATHS... --checkpoint CKPT --out feats.npz [--align]``: photos, the checkpoint and
the output may be local paths or ``gs://`` URLs. ``--out`` must name an ``.npz``; an existing file is
replaced only when it is an earlier .npz (a photo typed after ``--out`` is never overwritten)."""
from __future__ import annotations

from adaface_jax.cli import positive_int
from adaface_jax.errors import InputError


def add_arguments(parser):
    parser.add_argument("paths", nargs="+", help="images: aligned 112x112 crops, or photos with --align")
    parser.add_argument("--checkpoint", required=True, help="a PyTorch AdaFace .ckpt or a converted/trained directory")
    parser.add_argument("--arch", default=None, help="architecture (inferred from the checkpoint when omitted)")
    parser.add_argument("--out", required=True, help="output .npz: sources, embeddings, norms, ok, errors")
    parser.add_argument("--align", action="store_true", help="detect (MTCNN) and align each photo first")
    parser.add_argument("--select", choices=["score", "largest"], default="score",
                        help="which face to keep when a photo has several (default: highest score, as the original)")
    parser.add_argument("--flip-test", action="store_true", help="add the horizontally flipped view (pre_norm_vector_add)")
    parser.add_argument("--batch-size", type=positive_int, default=64)


def run(args) -> int:
    from adaface_jax.inference import load_pretrained
    from adaface_jax.io import check_output_file, check_path
    from adaface_jax.photos import embed_photos

    out = check_output_file(args.out, "--out", suffixes=(".npz",))
    checkpoint = check_path(args.checkpoint, "--checkpoint")
    for path in args.paths:
        if check_path(path, "photo") == out:
            raise InputError(f"--out {args.out}: is also one of the photos to embed")
    model = load_pretrained(checkpoint, arch=args.arch)
    result = embed_photos(model, args.paths, align=args.align, flip_test=args.flip_test, select=args.select,
                          batch_size=args.batch_size, progress=True)
    result.save(out)
    print(f"wrote {args.out}: {int(result.ok.sum())}/{len(result.ok)} images embedded "
          f"({model.arch}, dim {result.embeddings.shape[1]})")
    for src, err in zip(result.sources, result.errors):
        if err:
            print(f"  {src}: {err}")
    return 0 if result.ok.all() else 1
