"""`adaface-jax prepare rec|folder|list|bin SRC OUT`: convert face datasets to TFRecord shards (or cache a .bin)."""
from __future__ import annotations

import argparse
import json

EPILOG = (
    "SRC and OUT are local paths or gs:// URLs. OUT's manifest.json is written last: until it exists OUT is an "
    "unfinished conversion, which `check` and training refuse and which rerunning the same command resumes "
    "(another source into it is refused unless --force). "
    "folder: SRC/<identity>/<images> (images may sit in subfolders of an identity folder; names starting "
    "with '.' are ignored). Refused: images directly in SRC with no identity folders; SRC holding only one "
    "folder of folders (an unpacked archive's wrapper: the error names the folder to pass); a single "
    "identity; an identity folder with no image in a format we read (it would be an empty class); a folder "
    "that cannot be read; OUT inside SRC. Skipped, and counted and named in the printed summary "
    "(num_skipped_files, skipped_files) and in the manifest: files in formats we do not read (e.g. .heic, .txt) "
    "and images lying directly in SRC next to identity folders. An unreadable or undecodable image (or a FIFO, "
    "socket or broken link) stops the conversion naming it, or with --skip-corrupt is skipped and counted "
    "(num_skipped_corrupt). OUT may not be an existing file, nor a folder holding files the conversion would "
    "replace without holding a dataset of ours.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("kind", choices=["rec", "folder", "list", "bin"],
                        help="rec: InsightFace train.rec(+.idx) or its dataset folder (train.rec, train.idx, "
                             "property); folder: one subfolder per identity (see below); list: "
                             "'path<TAB>label' file; bin: decode a validation .bin into a .npy cache")
    parser.add_argument("src", help="source .rec / folder / list file / .bin (local or gs://)")
    parser.add_argument("out", help="output dataset directory (for bin: the cache directory; local or gs://)")
    parser.add_argument("--idx", default=None, help="the .idx of a .rec (default: next to it; scanned if absent)")
    parser.add_argument("--root", default=None, help="list mode: folder that relative paths start from")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="skip corrupt records/images (counted in the manifest) instead of stopping")
    parser.add_argument("--channel-order", choices=["RGB", "BGR"], default="RGB",
                        help="what a standard decoder returns for the stored images (RGB for InsightFace .rec "
                             "and normal photos; BGR only for sources that were saved swapped)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--shard-mb", type=float, default=150.0, help="target shard size in MB")
    parser.add_argument("--num-shards", type=int, default=None, help="fixed shard count (overrides --shard-mb)")
    parser.add_argument("--name", default="faces", help="dataset name used in shard file names")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order across shards")
    parser.add_argument("--no-decode-check", action="store_true",
                        help="do not decode every image with the training decoder (faster; a damaged image then "
                             "only shows in training, where it is replaced and counted)")
    parser.add_argument("--force", action="store_true",
                        help="replace a dataset of another source already in OUT (default: refuse; the same "
                             "source resumes)")


def run(args: argparse.Namespace) -> int:
    from adaface_jax import io  # noqa: PLC0415
    from adaface_jax.errors import InputError  # noqa: PLC0415

    # every path first: a typo such as gs:/bucket must never become a local folder
    src = io.check_path(args.src, "source")
    out = io.check_output_dir(args.out, "cache folder" if args.kind == "bin" else "output folder")
    idx = io.check_path(args.idx, "--idx") if args.idx else None
    root = io.check_path(args.root, "--root") if args.root else None
    if args.workers is not None and args.workers < 0:
        raise InputError(f"--workers {args.workers}: expected 0 (in this process) or a positive count")
    if args.num_shards is not None and args.num_shards < 1:
        raise InputError(f"--num-shards {args.num_shards}: expected a positive count")
    if not args.shard_mb > 0:
        raise InputError(f"--shard-mb {args.shard_mb}: expected a positive size in MB")
    if args.kind == "bin":
        from data_pipeline.bin_reader import load_bin  # noqa: PLC0415
        images, issame = load_bin(src, cache_dir=out)
        print(json.dumps({"bin": src, "images": list(images.shape), "pairs": int(len(issame)),
                          "same": int(issame.sum()), "cache_dir": out}))
        return 0
    from data_pipeline import prepare  # noqa: PLC0415  (keeps `adaface-jax --help` fast)

    common = dict(name=args.name, num_workers=args.workers, shard_bytes=int(args.shard_mb * 1024 * 1024),
                  num_shards=args.num_shards, shuffle_seed=None if args.no_shuffle else 0,
                  channel_order=args.channel_order, skip_corrupt=args.skip_corrupt, force=args.force,
                  verify=not args.no_decode_check)
    if args.kind == "rec":
        manifest = prepare.convert_rec(src, out, idx_path=idx, **common)
    elif args.kind == "folder":
        manifest = prepare.convert_folder(src, out, **common)
    else:
        manifest = prepare.convert_list(src, out, root=root, **common)
    summary = {k: manifest[k] for k in ("num_images", "num_classes", "num_skipped_corrupt", "num_skipped_files",
                                        "resumed_shards", "seconds")}
    if manifest["skipped_files"]:  # named here too (the manifest lists them all)
        summary["skipped_files"] = [f["path"] for f in manifest["skipped_files"][:20]]
    print(json.dumps(summary | {"out": out, "shards": len(manifest["shards"])}))
    return 0
