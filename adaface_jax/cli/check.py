"""`adaface-jax check DATA_DIR`: decode every record of a prepared dataset with the training decoder and
verify counts, labels and shard checksums against manifest.json (see data_pipeline.check)."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", help="a dataset folder written by `adaface-jax prepare` / `synthesize` (local or "
                                         "gs://); one without manifest.json (an unfinished conversion) is refused")
    parser.add_argument("--threads", type=int, default=None, help="decoding threads (default: cores, at most 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from adaface_jax import io  # noqa: PLC0415
    from adaface_jax.errors import InputError  # noqa: PLC0415

    data_dir = io.check_path(args.data_dir, "dataset folder")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: expected a positive count")
    from data_pipeline.check import check_dataset, summary_line  # noqa: PLC0415

    report = check_dataset(data_dir, show_progress=not args.no_progress, threads=args.threads)
    if args.json:
        print(json.dumps(report))
    else:
        for problem in report["problems"]:
            print(f"BAD {problem}")
    if not report["ok"]:
        raise InputError(summary_line(report))
    print(summary_line(report))
    return 0
