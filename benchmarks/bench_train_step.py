"""Training-step throughput: our jitted JAX step vs the PyTorch reference, same model, batch and machine.

    python benchmarks/bench_train_step.py --archs ir_18 ir_50 --batch 16 --iters 3 --rounds 3

Both sides run one full step (train-mode backbone, AdaFace head, cross-entropy, backward, SGD with
the original's parameter groups) in float32 on the CPU. The JAX step is the trainer builder's, once per
``--cpu-convolutions`` choice (``config.cpu_convolutions``: XLA's Eigen convolution kernels with the
backbone's CPU backward rewrites, the default, and XLA's default YNNPACK kernels with autodiff's
backward); ``--autodiff-backward`` adds the Eigen side without the rewrites (``IResNet.cpu_backward`` off).
``--profile DIR`` then traces two steps of the first JAX side with ``jax.profiler`` into DIR (open it in
TensorBoard or Perfetto) and prints where the XLA threads' time went, by kind of op.
Every side is compiled and warmed up first; then ``--rounds`` rounds each time ``--iters`` steps of every
side in turn, so a slow patch of a shared machine hits all sides alike.
Printed: the median images/s of each side and its ratio to PyTorch's median; nothing is asserted. The JAX
step runs on a mesh over the local devices (1 CPU device unless XLA_FLAGS asks for more); PyTorch uses its
default intra-op threads.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import time

import numpy as np

import harness  # the repository and tests/ on sys.path
from adaface_jax.compile_options import CPU_CONVOLUTIONS  # noqa: E402


def jax_step_runner(arch, batch, num_classes, cpu_convolutions, cpu_backward=None):
    """(run(iters) -> seconds, compile seconds) for the recipe's step through the trainer builder."""
    import jax  # noqa: PLC0415

    from adaface_jax import parallel  # noqa: PLC0415
    from adaface_jax.train.setup import build_trainer  # noqa: PLC0415
    from configs.common import get_base_config  # noqa: PLC0415

    config = get_base_config(arch=arch, num_classes=num_classes)
    config.precision = "float32"
    config.cpu_convolutions = cpu_convolutions
    mesh = parallel.make_mesh(jax.local_devices())
    trainer = build_trainer(config, mesh, steps_per_epoch=100, cpu_backward=cpu_backward)
    holder = {"state": trainer.state}
    rs = np.random.RandomState(0)
    data = parallel.host_to_global({"image": rs.uniform(-1, 1, (batch, 112, 112, 3)).astype(np.float32),
                                    "label": rs.randint(0, num_classes, batch).astype(np.int32)}, mesh)

    def run(iters):
        t = time.perf_counter()
        for _ in range(iters):
            holder["state"], m = trainer.step(holder["state"], data)
        jax.block_until_ready(m)
        return time.perf_counter() - t

    compile_s = run(1)
    run(1)  # warm-up
    return run, compile_s


_HLO_NAME = re.compile(r"^[a-z][a-z0-9_-]*(\.\d+)?$")


def op_time_by_kind(trace_path, steps):
    """(seconds per step by kind of XLA op, calls by kind over all steps, XLA's compute threads) from a perfetto
    trace written by ``jax.profiler.trace``."""
    with gzip.open(trace_path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    # XLA's thunks carry the lower-case HLO names (transpose_copy_fusion.103, copy, ynn_fusion); the runtime's and
    # Python's events are CamelCase::, "$file:line" or "end: ..." names. The compute threads are XLA's Eigen
    # pool (the client threads mostly wait); a program small enough to run inline has only the caller's thread.
    thread_names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
                    if e.get("ph") == "M" and e.get("name") == "thread_name"}
    per_kind, calls, op_threads = collections.Counter(), collections.Counter(), set()
    for e in events:
        if e.get("ph") == "X" and _HLO_NAME.match(e["name"]):
            kind = re.sub(r"\.\d+$", "", e["name"])  # transpose_copy_fusion.103 -> transpose_copy_fusion
            per_kind[kind] += e.get("dur", 0) / 1e6 / steps
            calls[kind] += 1
            op_threads.add((e.get("pid"), e.get("tid")))
    pool = {t for t in op_threads if thread_names.get(t, "").startswith("tf_XLAEigen")}
    threads = pool or op_threads
    return per_kind, calls, threads


def profile_step(run, trace_dir, steps=2, top=12):
    """Trace ``steps`` steps of ``run`` into ``trace_dir`` and print the XLA threads' time per kind of op.

    The trace names XLA's thunks (fusions, copies, transposes, YNNPACK fusions) on its CPU threads; the work of
    Eigen's convolution kernels is not among the named events, so the threads' time left over is mostly the
    convolutions (and any idle time)."""
    import jax  # noqa: PLC0415

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        wall = run(steps) / steps
    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                    key=os.path.getmtime)
    if not traces:
        print(f"  profile: no perfetto trace written under {trace_dir}")
        return
    per_kind, calls, threads = op_time_by_kind(traces[-1], steps)
    if not per_kind:
        print(f"  profile: the trace in {trace_dir} has no XLA CPU op events to summarise")
        return
    budget = wall * max(len(threads), 1)
    named = sum(per_kind.values())
    print(f"  profile: {steps} steps traced into {trace_dir}; {wall:.2f} s per step on {len(threads)} XLA thread(s), "
          f"{budget:.2f} thread-s; per step, by kind of op:")
    for kind, seconds in per_kind.most_common(top):
        print(f"    {seconds * 1e3:9.1f} ms {100 * seconds / budget:5.1f}%  {kind} ({calls[kind] // steps} per step)")
    print(f"    {named * 1e3:9.1f} ms {100 * named / budget:5.1f}%  all named ops; the other "
          f"{100 * (1 - named / budget):.0f}% of the threads' time is the convolutions (Eigen's work is not among "
          "the named events) and any idle time", flush=True)


def torch_step_runner(arch, batch, num_classes):
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    import torch_reference  # noqa: PLC0415

    model = torch_reference.build_backbone(arch).train()
    head = torch_reference.AdaFace(512, num_classes, m=0.4, h=0.333, s=64.0, t_alpha=0.01)
    decay, no_decay = [], []
    for m in model.modules():
        if not list(m.children()):
            (no_decay if isinstance(m, nn.modules.batchnorm._BatchNorm) else decay).extend(m.parameters(recurse=False))
    opt = torch.optim.SGD([{"params": decay + [head.kernel], "weight_decay": 5e-4},
                           {"params": no_decay, "weight_decay": 0.0}], lr=0.1, momentum=0.9)
    rs = np.random.RandomState(0)
    x = torch.from_numpy(rs.uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32))
    y = torch.from_numpy(rs.randint(0, num_classes, batch)).long()

    def run(iters):
        t = time.perf_counter()
        for _ in range(iters):
            emb, norm = model(x)
            loss = nn.functional.cross_entropy(head(emb, norm, y), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    run(2)  # warm-up
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", type=harness.arch_name, default=["ir_18", "ir_50"])
    ap.add_argument("--batch", type=harness.positive_int, default=16)
    ap.add_argument("--num-classes", type=harness.positive_int, default=1000)
    ap.add_argument("--iters", type=harness.positive_int, default=3, help="steps per side per round")
    ap.add_argument("--rounds", type=harness.positive_int, default=3)
    ap.add_argument("--cpu-convolutions", nargs="+", default=list(CPU_CONVOLUTIONS), choices=CPU_CONVOLUTIONS)
    ap.add_argument("--autodiff-backward", action="store_true",
                    help="also time the Eigen step with autodiff's backward (no CPU backward rewrites)")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="then trace two steps of the first JAX side into DIR/<arch> and print the time by kind of op")
    args = ap.parse_args()
    if args.profile and os.path.exists(args.profile) and not os.path.isdir(args.profile):
        ap.error(f"--profile {args.profile}: exists and is not a folder")
    import torch  # noqa: PLC0415
    print(f"batch {args.batch}, {args.num_classes} classes, float32, CPU; torch threads {torch.get_num_threads()}; "
          f"{args.rounds} rounds of {args.iters} steps per side, medians")
    print(f"{'arch':8s} {'side':30s} {'img/s':>8s} {'per round':>24s} {'vs torch':>9s} {'compile s':>10s}")
    jax_sides = [(f"jax {choice}", choice, None) for choice in args.cpu_convolutions]
    if args.autodiff_backward:
        jax_sides.append(("jax eigen, autodiff backward", "eigen", False))
    for arch in args.archs:
        sides = {}
        for name, choice, cpu_backward in jax_sides:
            sides[name] = jax_step_runner(arch, args.batch, args.num_classes, choice, cpu_backward)
        sides["torch (original-style)"] = (torch_step_runner(arch, args.batch, args.num_classes), float("nan"))
        rates = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, (run, _) in sides.items():
                rates[name].append(args.iters * args.batch / run(args.iters))
        base = float(np.median(rates["torch (original-style)"]))
        for name, (_, compile_s) in sides.items():
            med = float(np.median(rates[name]))
            per = " ".join(f"{r:.2f}" for r in rates[name])
            print(f"{arch:8s} {name:30s} {med:8.2f} {per:>24s} {med / base:8.2f}x {compile_s:10.1f}", flush=True)
        if args.profile:
            first = jax_sides[0][0]
            print(f"{arch:8s} {first}:")
            profile_step(sides[first][0], os.path.join(args.profile, arch))


if __name__ == "__main__":
    harness.run_main(main)
