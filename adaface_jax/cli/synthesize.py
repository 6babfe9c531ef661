"""`adaface-jax synthesize OUT`: a synthetic identity dataset (TFRecords + manifest) and held-out .bin pairs."""
from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output dataset directory")
    parser.add_argument("--identities", type=int, default=200)
    parser.add_argument("--images-per-identity", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--severity", type=float, default=None,
                        help="fixed degradation severity in [0,1] (default: drawn per image, U(0,1)^2)")
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--val-identities", type=int, default=50,
                        help="held-out identities for the verification .bin (0: none)")
    parser.add_argument("--val-pairs", type=int, default=600)
    parser.add_argument("--val-name", default="synthetic_val.bin",
                        help="file name of the verification .bin written inside OUT")
    parser.add_argument("--force", action="store_true",
                        help="replace a dataset of another source already in OUT (default: refuse)")


def run(args: argparse.Namespace) -> int:
    from adaface_jax.errors import InputError  # noqa: PLC0415
    from data_pipeline import synthetic  # noqa: PLC0415

    # every argument is checked before anything is rendered
    synthetic.check_synthetic_args(args.identities, args.images_per_identity, args.severity)
    if args.workers is not None and args.workers < 0:
        raise InputError(f"--workers {args.workers}: expected 0 (in this process) or a positive count")
    if args.val_identities < 0 or args.val_pairs < 0:
        raise InputError(f"--val-identities {args.val_identities} / --val-pairs {args.val_pairs}: expected "
                         "non-negative counts (0: no verification .bin)")
    if args.val_identities == 1 and args.val_pairs > 0:
        raise InputError("--val-identities 1: need at least 2 held-out identities for different-identity pairs")
    if os.path.basename(args.val_name) != args.val_name or not args.val_name:
        raise InputError(f"--val-name {args.val_name!r}: expected a plain file name (written inside OUT)")
    manifest = synthetic.write_synthetic_dataset(args.out, args.identities, args.images_per_identity, args.seed,
                                                 severity=args.severity, image_format=args.format,
                                                 num_workers=args.workers, force=args.force)
    result = {"out": os.path.abspath(args.out), "num_images": manifest["num_images"],
              "num_classes": manifest["num_classes"], "quality_mean": manifest.get("quality", {}).get("mean")}
    if args.val_identities > 0 and args.val_pairs > 0:
        result["verification"] = synthetic.write_verification_bin(
            os.path.join(args.out, args.val_name), args.val_identities, args.val_pairs, args.seed)
    print(json.dumps(result))
    return 0
