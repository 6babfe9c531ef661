"""``adaface-jax evaluate``: run a protocol from a checkpoint or score precomputed features.

    adaface-jax evaluate --checkpoint DIR --protocol hq|ijbb|ijbc|ijbs|tinyface --data ROOT [--out DIR]
    adaface-jax evaluate --features FILE.npz --protocol ... --data ROOT

The work is ``adaface_jax.evaluate.run_evaluation``; its module docstring (the features-file format and the
outputs) is this command's ``--help`` epilog.
"""
from __future__ import annotations

import argparse

from adaface_jax import evaluate
from evaluation import FUSION_METHODS
from evaluation.evaluators import IDENTIFICATION


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = evaluate.__doc__.split("\n\n", 1)[1]  # the features-file format and the outputs
    parser.add_argument("--protocol", required=True, choices=evaluate.PROTOCOLS)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="converted checkpoint dir or a released .ckpt")
    src.add_argument("--features", help="precomputed features .npz (format in the module docstring)")
    parser.add_argument("--data", help="dataset root (hq: folder of *.bin; ijbb/ijbc: folder holding IJBB/ or "
                                       "IJBC/; tinyface: folder holding aligned_pad_0.1_pad_high/; ijbs: image root)")
    parser.add_argument("--bin", action="append", default=[], help="hq: an explicit .bin file (repeatable)")
    parser.add_argument("--out", help="output folder (default results/<protocol>/<name>)")
    parser.add_argument("--name", help="model name in the result tables (default: checkpoint/features stem)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--fusion", default="pre_norm_vector_add", choices=FUSION_METHODS)
    parser.add_argument("--no-flip", action="store_true", help="disable the flip test (IJB-S never flips)")
    parser.add_argument("--cache-dir", help="cache features (and decoded .bin images) here")
    parser.add_argument("--save-features", help="also write the extracted features to this .npz")
    parser.add_argument("--tie", default="stable", choices=evaluate.TIE_ORDERS,
                        help="rank tie order: stable (lower gallery index first) or reversed "
                             "(argsort(score)[::-1] as the reference's TinyFace/IJB-S code)")
    parser.add_argument("--nrof-folds", type=int, default=10)
    parser.add_argument("--ijbs-image-list", help="IJB-S image list CSV (default <data>/image_list_mtcnn_fail_skipped_v1.csv)")
    parser.add_argument("--ijbs-protocol", help="folder of the CS6 protocol CSVs (default <data>/protocol)")
    parser.add_argument("--tinyface-on-collision", default="error", choices=("error", "last"),
                        help="TinyFace file-stem collision: error, or keep the last file (reference)")
    parser.add_argument("--unknown-templates", default="error", choices=("error", "row0"),
                        help="IJB 1:1 pair with an unknown template id: error, or use row 0 (reference)")
    parser.add_argument("--tinyface-protocol", help="folder holding TinyFace's probe_img_ID_pairs.mat and "
                                                    "gallery_match_img_ID_pairs.mat (default "
                                                    "<data>/tinyface/Testing_Set; used when present)")
    parser.add_argument("--identification", choices=IDENTIFICATION, default=None,
                        help="ijbb/ijbc 1:N identification: auto (default; run when the 1:N files are there, skip "
                             "with a note when none is, refuse some-but-not-all), require, or skip")
    parser.add_argument("--drop-nan", action="store_true",
                        help="leave NaN feature rows (photos `adaface-jax embed` could not process) out, with "
                             "the pairs/templates/probes that use them, and report the counts; by default "
                             "NaN rows are an error")


def run(args) -> int:
    evaluate.run_evaluation(evaluate.EvaluationRequest(
        protocol=args.protocol, checkpoint=args.checkpoint, features=args.features, data=args.data,
        bins=tuple(args.bin), out=args.out, name=args.name, batch_size=args.batch_size, fusion=args.fusion,
        flip_test=not args.no_flip, cache_dir=args.cache_dir, save_features=args.save_features, tie=args.tie,
        nrof_folds=args.nrof_folds, ijbs_image_list=args.ijbs_image_list, ijbs_protocol=args.ijbs_protocol,
        tinyface_on_collision=args.tinyface_on_collision, unknown_templates=args.unknown_templates,
        tinyface_protocol=args.tinyface_protocol, identification=args.identification, drop_nan=args.drop_nan))
    return 0
