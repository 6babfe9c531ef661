"""Partial FC: memory and time of the classifier head step at millions of classes, sample rate 1 vs r < 1.

    python benchmarks/bench_partial_fc.py                      # C = 2M, E = 512, global batch 64, 8 CPU devices
    python benchmarks/bench_partial_fc.py --num-classes 200000 --rates 1 0.3 0.1 --iters 3

The head only (no backbone): replicated (B, E) unit embeddings and their norms -> AdaFace logits on the
class-sharded (E, C) kernel -> cross-entropy -> gradients of kernel and embeddings -> SGD with momentum
and weight decay on the whole kernel (kernel and momentum donated), jitted on a mesh of simulated CPU
devices (``--devices``, default 8).  r = 1 is the trainer's full-softmax path, r < 1 its Partial FC path
(``adaface_jax.train.partial_fc``).  Memory per device comes from the compiled step's
``memory_analysis()`` (arguments, peak temporaries); time is the mean over ``--iters`` steps after one
warm-up.  When it times more than one rate, each rate runs in a fresh child process: at C = 2M the kernel,
its momentum and their initialisation take most of a 24 GB machine, and the host memory of one rate is not
all returned before the next (the three rates in one process were killed for memory).  Printed, not asserted.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402  (the argparse types and run_main; the standard library only)


def one_process_per_rate(args) -> int:
    """Time each rate in a child process (this script with ``--rates r``), printing one table."""
    status = 0
    for i, rate in enumerate(args.rates):
        cmd = [sys.executable, os.path.abspath(__file__), "--num-classes", str(args.num_classes), "--embedding",
               str(args.embedding), "--batch", str(args.batch), "--devices", str(args.devices), "--iters",
               str(args.iters), "--rates", repr(rate)] + (["--no-header"] if i else [])
        code = subprocess.call(cmd)
        if code:  # a rate that failed (or was killed: a negative code) fails the run; the others still run
            print(f"rate {rate:g}: the child process ended with status {code}", file=sys.stderr)
            status = 1
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-classes", type=harness.positive_int, default=2_000_000)
    ap.add_argument("--embedding", type=harness.positive_int, default=512)
    ap.add_argument("--batch", type=harness.positive_int, default=64, help="global batch")
    ap.add_argument("--rates", type=harness.sample_rate, nargs="+", default=[1.0, 0.3, 0.1])
    ap.add_argument("--devices", type=harness.positive_int, default=8)
    ap.add_argument("--iters", type=harness.positive_int, default=3)
    ap.add_argument("--no-time", action="store_true", help="compile and report memory only")
    ap.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)  # a child after the first
    args = ap.parse_args()
    if len(args.rates) > 1 and not args.no_time:
        return one_process_per_rate(args)
    # before JAX starts: N simulated CPU devices
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from adaface_jax import heads, parallel  # noqa: PLC0415
    from adaface_jax.train import partial_fc  # noqa: PLC0415

    mesh = parallel.make_mesh()
    n = mesh.devices.size
    c, e, b = args.num_classes, args.embedding, args.batch
    padded = parallel.padded_num_classes(c, n)
    ks, rs = parallel.kernel_sharding(mesh), parallel.replicated(mesh)
    kw = dict(m=0.4, h=0.333, s=64.0, t_alpha=0.01)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))

    def loss_fn(kernel, emb, norm, labels, rng, rate):
        hs = heads.AdaFaceState.create()
        if rate < 1.0:
            loss, _ = partial_fc.sampled_head_loss(heads.adaface_logits, kw, emb, norm, labels, kernel, hs, rng,
                                                   mesh=mesh, num_classes=c, sample_rate=rate)
            return loss
        logits, _ = heads.adaface_logits(emb, norm, labels, kernel, hs, **kw)
        logits = jax.lax.with_sharding_constraint(logits, parallel.logits_sharding(mesh))
        return heads.softmax_cross_entropy(logits, labels, c)

    def make_step(rate):
        def step(kernel, mom, emb, norm, labels, rng):
            loss, (gk, ge) = jax.value_and_grad(loss_fn, argnums=(0, 1))(kernel, emb, norm, labels, rng, rate)
            updates, (_, (trace, _)) = tx.update(gk, (optax.EmptyState(), (optax.TraceState(mom), optax.EmptyState())),
                                                kernel)
            return optax.apply_updates(kernel, updates), trace.trace, loss, ge
        return jax.jit(step, in_shardings=(ks, ks, rs, rs, rs, rs), out_shardings=(ks, ks, rs, rs),
                       donate_argnums=(0, 1))

    init_kernel = jax.jit(lambda key: heads.init_kernel(key, e, padded), out_shardings=ks)
    zeros = jax.jit(lambda: jnp.zeros((e, padded), jnp.float32), out_shardings=ks)
    key = jax.random.PRNGKey(0)
    emb = jax.random.normal(jax.random.fold_in(key, 1), (b, e))
    norm = jnp.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / norm
    labels = jax.random.randint(jax.random.fold_in(key, 2), (b,), 0, c)

    if not args.no_header:
        print(f"Partial FC head step: {c} classes (padded {padded}), E={e}, global batch {b}, {n} simulated CPU "
              f"devices; per-device kernel shard {e}x{padded // n} float32 = {e * padded // n * 4 / 2 ** 20:.0f} MiB")
        print(f"{'rate':>5s} {'sampled/dev':>11s} {'args MiB':>9s} {'temp MiB':>9s} {'total MiB':>10s} "
              f"{'compile s':>9s} {'step ms':>9s}", flush=True)
    for rate in args.rates:
        k = padded // n if rate >= 1.0 else partial_fc.num_sampled(padded, n, rate, b)
        step = make_step(rate)
        abstract = [jax.ShapeDtypeStruct((e, padded), jnp.float32, sharding=ks)] * 2
        t = time.perf_counter()
        compiled = step.lower(*abstract, emb, norm, labels, key).compile()
        compile_s = time.perf_counter() - t
        ma = compiled.memory_analysis()
        arg, temp = ma.argument_size_in_bytes, ma.temp_size_in_bytes
        total = arg + ma.output_size_in_bytes - ma.alias_size_in_bytes + temp
        step_ms = float("nan")
        if not args.no_time:
            kernel, mom = init_kernel(key), zeros()
            kernel, mom, loss, _ = compiled(kernel, mom, emb, norm, labels, key)
            jax.block_until_ready(loss)
            t = time.perf_counter()
            for i in range(args.iters):
                kernel, mom, loss, _ = compiled(kernel, mom, emb, norm, labels, jax.random.fold_in(key, i))
            jax.block_until_ready(loss)
            step_ms = (time.perf_counter() - t) / args.iters * 1e3
            del kernel, mom
        print(f"{rate:5.2f} {k:11d} {arg / 2 ** 20:9.1f} {temp / 2 ** 20:9.1f} {total / 2 ** 20:10.1f} "
              f"{compile_s:9.1f} {step_ms:9.1f}", flush=True)


if __name__ == "__main__":
    harness.run_main(main)
