"""``adaface-jax train --config configs/X.py --workdir DIR [--config.a.b=value ...] [--init-from PATH]``.

Multi-host: start the same command on every host; the coordinator comes from --coordinator-address /
--num-processes / --process-id or the environment (TPU VMs and SLURM are detected by JAX).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

CONFIG_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a configs/*.py recipe; override fields with --config.a.b=value")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and TensorBoard events; resumes if present")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune from a PyTorch .ckpt, a converted directory or one of our workdirs/checkpoints "
                             "(the head is reinitialised when the class count differs)")
    parser.add_argument("--coordinator-address", default=None, help="host:port of process 0 (multi-host)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--cpu-collectives", default=None, choices=["gloo", "mpi"],
                        help="cross-process collectives on CPU (tests and debugging)")


def run(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge"):  # orbax logs every manager option at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from adaface_jax import parallel  # noqa: PLC0415
    from adaface_jax.train.config_io import apply_overrides, load_config  # noqa: PLC0415
    from adaface_jax.train.loop import TooManySkippedSteps, train  # noqa: PLC0415

    config = apply_overrides(load_config(args.config), args.overrides)
    if args.init_from and not os.path.exists(args.init_from):
        from adaface_jax.errors import InputError  # noqa: PLC0415
        raise InputError(f"--init-from {args.init_from}: no such file or directory")
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                    cpu_collectives=args.cpu_collectives)
    try:
        summary, _ = train(config, args.workdir, init_from=args.init_from)
    except TooManySkippedSteps as e:
        print(f"adaface-jax train: error: {e}", file=sys.stderr)
        return 3
    logging.info("finished: step %d (%s), last metrics %s", summary["step"], summary["stop_reason"],
                 summary["metrics"])
    return 0
