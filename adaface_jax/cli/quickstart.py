"""``adaface-jax quickstart``: synthesize data, train, evaluate and plot on this machine (the README's
main job; the steps are in ``adaface_jax.quickstart``)."""
from __future__ import annotations

from adaface_jax.cli import non_negative_int, positive_int

CONFIG_OVERRIDES = True


def add_arguments(parser):
    parser.add_argument("--workdir", default="runs/quickstart",
                        help="a folder or a gs:// URL: everything is written here (results.json last)")
    parser.add_argument("--config", default=None,
                        help="a configs/ file (default: configs/quickstart_cpu.py); --config.x=y overrides follow")
    parser.add_argument("--identities", type=positive_int, default=100, help="training identities")
    parser.add_argument("--images-per-identity", type=positive_int, default=24)
    parser.add_argument("--val-identities", type=positive_int, default=60,
                        help="held-out identities for verification (at least 2)")
    parser.add_argument("--val-pairs", type=positive_int, default=400,
                        help="verification pairs (at least 20: the 10-fold protocol also runs on each half, split at "
                             "the median pair quality)")
    parser.add_argument("--seed", type=non_negative_int, default=0)


def run(args) -> int:
    from adaface_jax.errors import InputError
    from adaface_jax.io import check_creatable_dir
    from adaface_jax.quickstart import run_quickstart

    workdir = check_creatable_dir(args.workdir, "--workdir")  # refused (one line) before anything is made
    if args.identities < 2 or args.val_identities < 2:
        raise InputError("--identities and --val-identities must be at least 2 (a classifier needs two classes, "
                         "a verification pair two identities)")
    if args.val_pairs < 20:
        raise InputError(f"--val-pairs {args.val_pairs}: at least 20 pairs (the 10-fold protocol needs 10, and it also "
                         "runs on the low- and the high-quality half)")
    run_quickstart(workdir, config_path=args.config, overrides=args.overrides, identities=args.identities,
                   images_per_identity=args.images_per_identity, val_identities=args.val_identities,
                   val_pairs=args.val_pairs, seed=args.seed)
    return 0
