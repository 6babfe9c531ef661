"""`adaface-jax synthesize OUT`: a synthetic identity dataset (TFRecords + manifest) and held-out .bin pairs."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("OUT is a local folder or a gs:// URL. The verification .bin is written with the shards and "
                     "before manifest.json, which comes last: an interrupted run is never taken for a finished "
                     "dataset, and rerunning the same command resumes it. OUT may not be an existing file, and an "
                     "existing file at --val-name is replaced only when it is an earlier .bin.")
    parser.add_argument("out", help="output dataset directory (local or gs://)")
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
    from adaface_jax import io  # noqa: PLC0415
    from adaface_jax.errors import InputError  # noqa: PLC0415
    from data_pipeline import synthetic  # noqa: PLC0415

    # every argument is checked before anything is rendered
    out = io.check_output_dir(args.out, "output folder")
    synthetic.check_synthetic_args(args.identities, args.images_per_identity, args.severity)
    if args.workers is not None and args.workers < 0:
        raise InputError(f"--workers {args.workers}: expected 0 (in this process) or a positive count")
    if args.val_identities < 0 or args.val_pairs < 0:
        raise InputError(f"--val-identities {args.val_identities} / --val-pairs {args.val_pairs}: expected "
                         "non-negative counts (0: no verification .bin)")
    if args.val_identities == 1 and args.val_pairs > 0:
        raise InputError("--val-identities 1: need at least 2 held-out identities for different-identity pairs")
    if not args.val_name or "/" in args.val_name or args.val_name in (".", ".."):
        raise InputError(f"--val-name {args.val_name!r}: expected a plain file name (written inside OUT)")
    verification = None
    if args.val_identities > 0 and args.val_pairs > 0:
        if not args.val_name.lower().endswith(".bin"):
            raise InputError(f"--val-name {args.val_name!r}: expected a file name ending in .bin")
        val_path = io.join(out, args.val_name)
        if io.isdir(out) or io.is_remote(out):  # an existing file there is replaced only if it is an earlier .bin
            io.check_output_file(val_path, "--val-name", suffixes=(".bin",))
            io.check_output_file(val_path[:-4] + ".quality.npy", "verification quality", suffixes=(".npy",))
        verification = {"name": args.val_name, "num_identities": args.val_identities, "num_pairs": args.val_pairs}
    manifest = synthetic.write_synthetic_dataset(out, args.identities, args.images_per_identity, args.seed,
                                                 severity=args.severity, image_format=args.format,
                                                 num_workers=args.workers, force=args.force,
                                                 verification=verification)
    result = {"out": out, "num_images": manifest["num_images"], "num_classes": manifest["num_classes"],
              "quality_mean": manifest.get("quality", {}).get("mean")}
    if verification is not None:
        info = manifest["verification"]
        result["verification"] = {"bin": io.join(out, info["bin"]), "quality": io.join(out, info["quality"]),
                                  "num_pairs": info["num_pairs"]}
    print(json.dumps(result))
    return 0
