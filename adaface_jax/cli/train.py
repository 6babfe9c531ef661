"""``adaface-jax train --config configs/X.py --workdir DIR [--config.a.b=value ...] [--init-from PATH]``.

Multi-host: start the same command on every host; the coordinator comes from --coordinator-address /
--num-processes / --process-id or the environment (TPU VMs and SLURM are detected by JAX).

Pre-flight: ``--dry-run`` compiles the step for the config without allocating the state or reading
data and prints per-device memory, FLOPs per image, collective traffic and whether it fits
``--device-memory GB`` (``adaface_jax.train.dry_run``); ``--simulate-devices N`` plans for N devices
on N simulated CPU devices.

Compilation cache: compiled steps are kept in JAX's persistent cache under ``$ADAFACE_JAX_CACHE``
(default ``~/.cache/adaface-jax/xla``), so a restarted or repeated run skips most of the compile.
``--no-compile-cache`` or ``ADAFACE_JAX_CACHE=off`` turns it off.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

CONFIG_OVERRIDES = True
CACHE_ENV = "ADAFACE_JAX_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from adaface_jax.cli import positive_int  # noqa: PLC0415

    parser.add_argument("--config", required=True, help="a configs/*.py recipe; override fields with --config.a.b=value")
    parser.add_argument("--workdir", default=None,
                        help="checkpoints, logs and TensorBoard events; resumes if present (required unless --dry-run)")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune from a PyTorch .ckpt, a converted directory or one of our workdirs/checkpoints "
                             "(the head is reinitialised when the class count differs)")
    parser.add_argument("--coordinator-address", default=None, help="host:port of process 0 (multi-host)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--cpu-collectives", default=None, choices=["gloo", "mpi"],
                        help="cross-process collectives on CPU (tests and debugging)")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile the step without allocating or reading data; print per-device memory, "
                             "FLOPs per image, collective bytes and whether it fits --device-memory")
    parser.add_argument("--simulate-devices", type=positive_int, default=None, metavar="N",
                        help="with --dry-run: plan for N devices, simulated on the CPU")
    parser.add_argument("--device-memory", type=float, default=None, metavar="GB",
                        help="with --dry-run: memory per device in GB (1e9 bytes) to check the plan against")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help=f"do not use JAX's persistent compilation cache (${CACHE_ENV}, default "
                             "~/.cache/adaface-jax/xla; ADAFACE_JAX_CACHE=off also disables it)")


def compile_cache_dir(disabled: bool = False):
    """The persistent compilation cache directory, or None when turned off."""
    value = os.environ.get(CACHE_ENV)
    if disabled or (value is not None and value.strip().lower() in _OFF):
        return None
    from adaface_jax import io  # noqa: PLC0415
    # JAX's cache reads and writes through etils.epath, so a bucket shared by a pod's hosts works too
    return io.check_path(value or os.path.join("~", ".cache", "adaface-jax", "xla"), CACHE_ENV)


def enable_compile_cache(disabled: bool = False):
    import jax  # noqa: PLC0415

    from adaface_jax import io  # noqa: PLC0415

    path = compile_cache_dir(disabled)
    if path is None:
        return None
    io.makedirs(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def _simulate(count: int) -> None:
    """N simulated CPU devices: XLA_FLAGS must be set before the JAX backend starts."""
    from adaface_jax.errors import InputError  # noqa: PLC0415
    from adaface_jax.train.dry_run import simulate_devices_flags  # noqa: PLC0415

    os.environ["XLA_FLAGS"] = simulate_devices_flags(os.environ.get("XLA_FLAGS", ""), count)
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        import jax  # noqa: PLC0415
        from jax._src import xla_bridge  # noqa: PLC0415
        if xla_bridge.backends_are_initialized():
            if jax.device_count() != count or jax.default_backend() != "cpu":
                raise InputError(f"--simulate-devices {count}: JAX already started with {jax.device_count()} "
                                 f"{jax.default_backend()} devices in this process; run the command in a new process")
            return
        jax.config.update("jax_platforms", "cpu")


def run(args) -> int:
    from adaface_jax.errors import InputError  # noqa: PLC0415

    if args.simulate_devices and not args.dry_run:
        raise InputError("--simulate-devices is only for --dry-run (a plan on simulated CPU devices)")
    if args.device_memory is not None and not args.dry_run:
        raise InputError("--device-memory is only for --dry-run")
    if args.simulate_devices:
        _simulate(args.simulate_devices)  # before JAX initialises
    if not args.dry_run and not args.workdir:
        raise InputError("--workdir is required (unless --dry-run)")
    if not args.dry_run:  # paths first: an unknown scheme or a one-slash URL is refused before anything starts
        from adaface_jax import io  # noqa: PLC0415
        from adaface_jax.run_dir import RunDir  # noqa: PLC0415
        RunDir.of(args.workdir)
        if args.init_from and not io.exists(io.check_path(args.init_from, "--init-from")):
            raise InputError(f"--init-from {args.init_from}: no such file or directory")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge"):  # orbax logs every manager option at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from adaface_jax import parallel  # noqa: PLC0415
    from adaface_jax.train.config import apply_overrides, load_config  # noqa: PLC0415
    from adaface_jax.train.loop import TooManySkippedSteps, train  # noqa: PLC0415

    config = apply_overrides(load_config(args.config), args.overrides)
    cache = enable_compile_cache(args.no_compile_cache)
    if args.dry_run:
        from adaface_jax.train.dry_run import format_plan, plan  # noqa: PLC0415
        print(format_plan(plan(config, device_memory_gb=args.device_memory)), flush=True)
        return 0
    if cache:
        logging.info("compilation cache: %s (--no-compile-cache or %s=off to disable)", cache, CACHE_ENV)
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                    cpu_collectives=args.cpu_collectives)
    from adaface_jax.cli import peer_failed  # noqa: PLC0415

    parallel.watch_for_peer_failure(peer_failed("train"))  # one process failing stops them all, in seconds
    try:
        summary, _ = train(config, args.workdir, init_from=args.init_from)
    except TooManySkippedSteps as e:
        print(f"adaface-jax train: error: {e}", file=sys.stderr)
        return 3
    logging.info("finished: step %d (%s), last metrics %s", summary["step"], summary["stop_reason"],
                 summary["metrics"])
    return 0
