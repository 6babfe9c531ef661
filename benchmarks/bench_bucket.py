"""Training from a bucket: the cost of a gs:// workdir and of a gs:// dataset, against local ones measured in the
same run, on an emulated Cloud Storage bucket (tests/support/gcs_server.py: a real Cloud Storage JSON API server on
loopback, in memory, behind a TLS-ending proxy for TensorFlow).

    python benchmarks/bench_bucket.py                      # ir_18 at width 8, 112x112, batch 16 (about 4 min)
    python benchmarks/bench_bucket.py --arch tiny --image-size 16 --batch 8 --num-classes 8 --steps 5 --warmup 1 \
        --save-every 4 --log-every 2 --train-rounds 1 --save-repeats 1 --images 40 --input-batch 8 \
        --input-batches 1 --rounds 1                       # the smallest run (about 30 s)

Printed (nothing is asserted; a shared machine moves every figure):

* **Train step.** ``loop.train`` runs the same model on the same batches (the random source, so no input
  pipeline competes) with its workdir on the local disk, in the bucket with orbax's asynchronous save (the
  default), and in the bucket with a synchronous save, saving every ``--save-every`` steps; ``--train-rounds``
  runs per side, the sides in turn, medians. Every step blocks until its arrays are ready, so each loop
  iteration's wall time is its own: the steady step (the second half of each save period, far from a save), the
  step that saves (the save's foreground: the device->host copy, and for a synchronous save the upload), the
  step right after it, what a save costs the loop in all (the save step's and the following steps' time over
  steady: a background save competes with them for the CPU), and the metrics.jsonl write of a log step (on a
  bucket the object is rewritten whole: an object store cannot append).
* **Checkpoint save**, measured directly on the final state: the foreground time (what a step pays) and the
  time until the checkpoint is durable (committed), and the foreground's share of the step time at a checkpoint
  every ``--checkpoint-every`` steps (the recipe's 2000 by default).
* **Input.** The training input pipeline (``data_pipeline.input.make_train_iterator`` with the trainer's
  settings, 112x112 with the recipe's augmentation) reading a synthetic prepared dataset from the bucket and from
  its local copy, in alternating rounds; with the tf.data parallel-read settings of ``data_pipeline/input.py``.

The emulator answers on loopback in about a millisecond with Python's throughput, and its process shares the
CPU with the run; a real bucket answers each request after tens of milliseconds with far more bandwidth, on
other machines. The ratios show what the code does per request (how many, whether the step waits on them), not
what a given bucket will cost.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

import harness  # the repository (tests.support: the Cloud Storage server) on sys.path


def model_name(text: str) -> str:
    """argparse type: a backbone of the model zoo or the tiny test backbone."""
    from adaface_jax.models import MODEL_NAMES  # noqa: PLC0415

    if text not in MODEL_NAMES:
        raise argparse.ArgumentTypeError(f"unknown arch {text!r}; expected one of {', '.join(sorted(MODEL_NAMES))}")
    return text


# ----------------------------------------------------------------------------------------------- train step

def step_config(args, async_save: bool):
    from configs.common import get_base_config  # noqa: PLC0415

    c = get_base_config(arch=args.arch, num_classes=args.num_classes)
    c.seed = 0
    c.model.width = args.width
    c.precision = "float32"
    c.global_batch_size = args.batch
    c.total_steps = args.warmup + args.steps + 1  # the last iteration has no next batch to end its timing
    c.data.source = "random"
    c.data.num_images = args.batch * 10 ** 6  # no epoch end (no extra save) in the run
    c.data.image_size = args.image_size
    c.log_every = args.log_every
    c.progress = False
    c.sample_grid = False
    c.evals.verification.every_epochs = 0
    c.checkpoint.every_steps = args.save_every
    c.checkpoint.keep = 2
    c.checkpoint.async_save = async_save
    return c


def timed_training(config, workdir):
    """``loop.train`` with each step blocking until its arrays are ready. Returns ({step: seconds of its loop
    iteration, from taking its batch to taking the next, less its metrics.jsonl write}, {log step: seconds of its
    metrics.jsonl write}, final state)."""
    import jax  # noqa: PLC0415

    from adaface_jax.train import loop  # noqa: PLC0415

    marks, writes = [], {}
    make_input, build_trainer, write = loop.make_input, loop.build_trainer, loop.MetricsLog.write

    def marked_input(cfg, start):
        for batch in make_input(cfg, start):
            marks.append(time.perf_counter())
            yield batch

    def blocking_trainer(*a, **k):
        trainer = build_trainer(*a, **k)
        step = trainer.step

        def blocking(state, batch):
            return jax.block_until_ready(step(state, batch))
        return dataclasses.replace(trainer, step=blocking)

    def timed_write(self, step, scalars):
        t = time.perf_counter()
        write(self, step, scalars)
        writes[step] = writes.get(step, 0.0) + time.perf_counter() - t

    loop.make_input, loop.build_trainer, loop.MetricsLog.write = marked_input, blocking_trainer, timed_write
    try:
        _, state = loop.train(config, workdir)
    finally:
        loop.make_input, loop.build_trainer, loop.MetricsLog.write = make_input, build_trainer, write
    iterations = {i + 1: b - a - writes.get(i + 1, 0.0) for i, (a, b) in enumerate(zip(marks, marks[1:]))}
    return iterations, writes, state


def classify(iterations: dict, args) -> dict:
    """Medians (seconds) of the timed steps (after --warmup), by where they fall in the save period P: 'steady' =
    the second half of each period (far from a save), 'save' = the step that saves, 'after' = the step right after
    it; 'cost' = what a save costs the loop: the save step's and the following P/2 - 1 steps' time over steady (a
    background save competes with them for the CPU), summed, median over the complete periods."""
    period, half = args.save_every, args.save_every // 2
    timed = {s: t for s, t in iterations.items() if s > args.warmup}
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    steady = med([t for s, t in timed.items() if s % period >= half])
    costs = [sum(timed[s + j] - steady for j in range(half)) for s in timed
             if s % period == 0 and all(s + j in timed for j in range(half))]
    return {"steady": steady, "save": med([t for s, t in timed.items() if s % period == 0]),
            "after": med([t for s, t in timed.items() if s % period == 1]), "cost": med(costs)}


def time_saves(state, sides, repeats: int) -> dict:
    """{side: (median foreground seconds, median seconds until committed)} of ``Checkpointer.save`` of ``state``
    into fresh folders under each side's root, the sides in turn, after one round not counted (orbax's handlers
    start). ``sides``: {name: (root folder, async_save)}."""
    from adaface_jax import io  # noqa: PLC0415
    from adaface_jax.train.checkpointer import Checkpointer  # noqa: PLC0415
    from adaface_jax.run_dir import RunDir  # noqa: PLC0415

    times = {name: ([], []) for name in sides}
    for r in range(repeats + 1):
        for name, (root, async_save) in sides.items():
            ckpt = Checkpointer(RunDir(io.join(root, f"save{r}")), max_to_keep=1, async_save=async_save)
            t0 = time.perf_counter()
            ckpt.save(state, {"bench": r}, force=True)
            t1 = time.perf_counter()
            ckpt.wait()
            t2 = time.perf_counter()
            ckpt.close()
            if r:
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t0)
    return {name: (statistics.median(fg), statistics.median(total)) for name, (fg, total) in times.items()}


def bench_train_step(args, bucket, local_root):
    import jax  # noqa: PLC0415

    from adaface_jax.cli.train import enable_compile_cache  # noqa: PLC0415

    cache = enable_compile_cache()  # as `adaface-jax train`: the second and third runs reuse the compiled step
    sides = [("local", os.path.join(local_root, "run_async"), True), ("bucket", f"{bucket}/run_async", True),
             ("bucket", f"{bucket}/run_sync", False)]
    print(f"\n== train step: {args.arch} width {args.width}, {args.image_size}x{args.image_size}, batch {args.batch}, "
          f"{args.num_classes} classes, float32, {jax.local_device_count()} {jax.default_backend()} device(s); "
          f"{args.train_rounds} runs per side in turn of {args.steps} timed steps after {args.warmup}, a save every "
          f"{args.save_every} and a log line every {args.log_every} steps (compilation cache: {cache or 'off'})")
    print(f"{'workdir':9s} {'save':6s} {'steady ms':>10s} {'save step ms':>13s} {'next step ms':>13s} "
          f"{'save costs the loop ms':>23s} {'metrics write ms':>17s}")
    per_round, state = {(where, a): [] for where, _, a in sides}, None
    for r in range(args.train_rounds):  # the sides in turn, so a busy spell of a shared machine hits them alike
        for where, workdir, async_save in sides:
            iterations, writes, state = timed_training(step_config(args, async_save), f"{workdir}_{r}")
            med = classify(iterations, args)
            med["write"] = statistics.median(writes.values()) if writes else 0.0
            per_round[(where, async_save)].append(med)
    results = {}
    for (where, async_save), meds in per_round.items():
        med = {k: statistics.median(m[k] for m in meds) for k in meds[0]}
        results[(where, async_save)] = med
        kind = "async" if async_save else "sync"
        print(f"{where:9s} {kind:6s} {1e3 * med['steady']:10.1f} {1e3 * med['save']:13.1f} {1e3 * med['after']:13.1f} "
              f"{1e3 * med['cost']:23.1f} {1e3 * med['write']:17.1f}", flush=True)
    local, remote, sync = results[("local", True)], results[("bucket", True)], results[("bucket", False)]
    over = {k: (1e3 * (r["save"] - r["steady"]), 1e3 * (r["after"] - r["steady"]))
            for k, r in (("remote", remote), ("sync", sync), ("local", local))}
    print(f"async save in the bucket: the save step takes {over['remote'][0]:+.1f} ms over a steady step and the step "
          f"right after it {over['remote'][1]:+.1f} ms (a synchronous save: {over['sync'][0]:+.1f} ms and "
          f"{over['sync'][1]:+.1f} ms; local async: {over['local'][0]:+.1f} ms and {over['local'][1]:+.1f} ms)")

    nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                 for x in jax.tree_util.tree_leaves(state.checkpoint_items()))
    print(f"\n== checkpoint save, measured directly ({nbytes / 2**20:.2f} MiB of state, median of "
          f"{args.save_repeats}): share of the step time at a checkpoint every {args.checkpoint_every} steps")
    print(f"{'workdir':9s} {'save':6s} {'foreground ms':>14s} {'committed ms':>13s} {'MiB/s':>8s} {'share':>9s} "
          f"{'committed within the period':>28s}")
    measured = time_saves(state, {("local", True): (os.path.join(local_root, "saves_async"), True),
                                  ("bucket", True): (f"{bucket}/saves_async", True),
                                  ("bucket", False): (f"{bucket}/saves_sync", False)}, args.save_repeats)
    saves = {}
    for (where, async_save), (fg, total) in measured.items():
        saves[(where, async_save)] = fg
        period = args.checkpoint_every * results[(where, async_save)]["steady"]
        print(f"{where:9s} {'async' if async_save else 'sync':6s} {1e3 * fg:14.1f} {1e3 * total:13.1f} "
              f"{nbytes / 2**20 / total:8.2f} {100 * fg / (period + fg):8.3f}% "
              f"{'yes' if total < period else 'NO (the next save waits)':>28s}", flush=True)

    def per_step(key):
        """A steady step with its share of a log line every --log-every steps and of a save every
        --checkpoint-every (what a save cost the loop in the timed run, or its foreground if that is more)."""
        r = results[key]
        cost = max(r["cost"], saves[key]) if np.isfinite(r["cost"]) else saves[key]
        return r["steady"] + r["write"] / args.log_every + cost / args.checkpoint_every

    print(f"per step with a log line every {args.log_every} and a checkpoint every {args.checkpoint_every} steps: "
          f"local {1e3 * per_step(('local', True)):.1f} ms, bucket {1e3 * per_step(('bucket', True)):.1f} ms (async "
          f"save), {1e3 * per_step(('bucket', False)):.1f} ms (sync save)")
    print(f"ratio, train step with the workdir in the bucket / local (async save): "
          f"{per_step(('bucket', True)) / per_step(('local', True)):.2f}x per step at those periods, "
          f"{remote['steady'] / local['steady']:.2f}x for the step alone")


# ---------------------------------------------------------------------------------------------------- input

def input_settings() -> str:
    """The tf.data parallel-read settings of data_pipeline/input.py (TrainInputConfig's defaults)."""
    from data_pipeline.input import TrainInputConfig  # noqa: PLC0415

    names = ("parallel_reads", "cycle_length", "num_streams", "num_parallel_calls", "prefetch_batches",
             "shuffle_buffer", "threads")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainInputConfig)}
    shown = ", ".join(f"{n}={defaults[n]}" for n in names if n in defaults)
    if "parallel_reads" in defaults and defaults["parallel_reads"] is None:
        shown += " (parallel_reads None: tf.data.AUTOTUNE reads in flight for gs://, sequential for a local disk)"
    return shown + " (num_parallel_calls -1 = AUTOTUNE)"


def bench_input(args, local_data, remote_data):
    from data_pipeline.input import TrainInputConfig, make_train_iterator  # noqa: PLC0415

    has_reads = "parallel_reads" in {f.name for f in dataclasses.fields(TrainInputConfig)}
    sides = [("local", local_data, {}), ("bucket", remote_data, {})]
    if has_reads:
        sides.append(("bucket, sequential reads", remote_data, {"parallel_reads": 0}))
    print(f"\n== input: make_train_iterator, {args.input_batch} images a batch at 112x112 with augmentation, "
          f"{args.rounds} rounds of {args.input_batches} batches per side after its first, alternating")
    print(f"data_pipeline/input.py settings: {input_settings()}")
    rates, start_s = {name: [] for name, _, _ in sides}, {name: [] for name, _, _ in sides}
    for _ in range(args.rounds):
        for name, data_dir, extra in sides:  # a fresh pipeline each time: no other one runs meanwhile
            t = time.perf_counter()
            it = make_train_iterator(TrainInputConfig(data_dir=data_dir, global_batch_size=args.input_batch, seed=0,
                                                      **extra))
            next(it)  # start-up: manifest, record offsets, the shuffle buffers' first fill
            t1 = time.perf_counter()
            for _ in range(args.input_batches):
                next(it)
            rates[name].append(args.input_batches * args.input_batch / (time.perf_counter() - t1))
            start_s[name].append(t1 - t)
            del it
    base = statistics.median(rates["local"])
    print(f"{'dataset':26s} {'img/s':>8s} {'per round':>24s} {'vs local':>9s} {'start s':>8s}")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"{name:26s} {med:8.1f} {' '.join(f'{x:.0f}' for x in r):>24s} {med / base:8.2f}x "
              f"{statistics.median(start_s[name]):8.2f}")
    print(f"ratio, input images/s from the bucket / local: {statistics.median(rates['bucket']) / base:.2f}x")


# ----------------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=model_name, default="ir_18")
    ap.add_argument("--width", type=harness.positive_int, default=8, help="first-stage channels (64 released)")
    ap.add_argument("--image-size", type=harness.positive_int, default=112)
    ap.add_argument("--batch", type=harness.positive_int, default=16)
    ap.add_argument("--num-classes", type=harness.positive_int, default=5000, help="the head's width (checkpoint size)")
    ap.add_argument("--steps", type=harness.positive_int, default=32, help="timed steps per side and round")
    ap.add_argument("--train-rounds", type=harness.positive_int, default=3, help="runs per side (in turn), medians")
    ap.add_argument("--warmup", type=harness.positive_int, default=2, help="steps not timed (compile)")
    ap.add_argument("--save-every", type=harness.positive_int, default=10, help="checkpoint period in the timed runs")
    ap.add_argument("--log-every", type=harness.positive_int, default=10)
    ap.add_argument("--checkpoint-every", type=harness.positive_int, default=2000,
                    help="the checkpoint period the save's share is computed for (the recipe's)")
    ap.add_argument("--save-repeats", type=harness.positive_int, default=3)
    ap.add_argument("--images", type=harness.positive_int, default=2000, help="images of the synthetic dataset")
    ap.add_argument("--input-batch", type=harness.positive_int, default=64)
    ap.add_argument("--input-batches", type=harness.positive_int, default=10, help="batches per side per round")
    ap.add_argument("--rounds", type=harness.positive_int, default=3)
    args = ap.parse_args()
    if args.save_every < 4:
        ap.error(f"--save-every: expected an integer >= 4 (steady steps lie between saves), got {args.save_every}")

    import absl.logging  # noqa: PLC0415
    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax's per-save notices; the tables say it
    from tests.support.gcs_server import GcsServer  # noqa: PLC0415  (the repository, on sys.path through harness)

    from adaface_jax import io  # noqa: PLC0415
    from data_pipeline.synthetic import write_synthetic_dataset  # noqa: PLC0415

    local_root = tempfile.mkdtemp(prefix="bench-bucket-")
    server = GcsServer().start()
    try:
        os.environ.update(server.env)  # the in-process clients (tf.io.gfile, tensorstore) reach the emulator
        bucket = f"gs://{server.make_bucket()}"
        local_data = os.path.join(local_root, "data")
        ids = max(2, args.images // 20)
        t = time.perf_counter()
        write_synthetic_dataset(local_data, ids, max(1, args.images // ids), seed=0, show_progress=False)
        remote_data = f"{bucket}/data"
        names = []
        for folder, _, files in os.walk(local_data):
            rel = os.path.relpath(folder, local_data)
            for name in files:
                io.copy(os.path.join(folder, name), io.join(remote_data, *([] if rel == "." else [rel]), name))
                names.append(name)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(local_data) for f in fs)
        print(f"emulated bucket {bucket} at {server.url} (loopback, in memory); dataset: "
              f"{ids * max(1, args.images // ids)} images, {len(names)} files, {size / 2**20:.1f} MiB, written and "
              f"uploaded in {time.perf_counter() - t:.1f} s")
        bench_train_step(args, bucket, local_root)
        bench_input(args, local_data, remote_data)
    finally:
        server.stop()
        shutil.rmtree(local_root, ignore_errors=True)


if __name__ == "__main__":
    harness.run_main(main)
