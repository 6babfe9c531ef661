"""Images/s per chip and model-FLOPs utilisation of the training step on an accelerator.

    # on a GPU/TPU host (bfloat16 backbone, ir_101, WebFace12M-sized head):
    python benchmarks/device_train_mfu.py --arch ir_101 --per-chip-batch 128 --num-classes 617970
    # proof that it runs, on CPU with tiny settings:
    python benchmarks/device_train_mfu.py --arch ir_18 --per-chip-batch 2 --num-classes 64 --steps 2 \
        --peak-tflops 0.1 --float32

FLOPs per step come from the compiled step's XLA cost analysis (summed over devices where the
backend reports per-device numbers); MFU = achieved FLOP/s / (chips x peak FLOP/s per chip).  The
peak comes from --peak-tflops or a small table of dense bf16 peaks by device kind.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                    "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "L4": 121.0}


def peak_tflops(kind: str):
    for key, v in PEAK_BF16_TFLOPS.items():
        if key.lower() in kind.lower():
            return v
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ir_50")
    ap.add_argument("--per-chip-batch", type=int, default=128)
    ap.add_argument("--num-classes", type=int, default=205990)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s per chip in TFLOP/s")
    ap.add_argument("--float32", action="store_true", help="float32 backbone (default bfloat16)")
    args = ap.parse_args()

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from adaface_jax import parallel  # noqa: PLC0415
    from adaface_jax.models import build_model  # noqa: PLC0415
    from adaface_jax.train import optimizer as optim  # noqa: PLC0415
    from adaface_jax.train.state import create_train_state, init_variables  # noqa: PLC0415
    from adaface_jax.train.step import StepConfig, make_train_step  # noqa: PLC0415

    mesh = parallel.make_mesh()
    chips = mesh.devices.size
    kind = jax.devices()[0].device_kind
    model = build_model(args.arch, dtype=jnp.float32 if args.float32 else jnp.bfloat16)
    padded = parallel.padded_num_classes(args.num_classes, chips)
    schedule = optim.lr_schedule(0.1, 1000, (12,))

    def init(rng):
        p, bs, hs = init_variables(model, rng, args.num_classes, padded_classes=padded)
        return create_train_state(p, bs, hs, optim.make_optimizer(schedule, p, bs), rng)

    state, shardings = parallel.create_sharded(init, mesh, jax.random.PRNGKey(0))
    cfg = StepConfig(head="adaface", head_kwargs=dict(m=0.4, h=0.333, s=64.0, t_alpha=0.01),
                     num_classes=args.num_classes, embedding_sharding=parallel.embedding_sharding(mesh),
                     logits_sharding=parallel.logits_sharding(mesh))
    step = parallel.jit_sharded(make_train_step(model, cfg), mesh, shardings)
    global_batch = args.per_chip_batch * chips
    rs = np.random.RandomState(jax.process_index())
    local = global_batch // jax.process_count()
    batch = parallel.host_to_global({"image": rs.uniform(-1, 1, (local, 112, 112, 3)).astype(np.float32),
                                     "label": rs.randint(0, args.num_classes, local).astype(np.int32)}, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    # XLA reports the per-device program for SPMD executables: scale to the whole step.
    flops_step = flops * chips

    for _ in range(args.warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(args.steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t) / args.steps

    peak = args.peak_tflops or peak_tflops(kind)
    print(f"device {kind} x{chips}; {args.arch} {'float32' if args.float32 else 'bfloat16'}; "
          f"{args.num_classes} classes (padded {padded}); global batch {global_batch}")
    print(f"compile {compile_s:.1f} s; step {dt * 1e3:.1f} ms; loss {float(m['loss']):.3f}")
    print(f"images/s total {global_batch / dt:.1f}; per chip {global_batch / dt / chips:.1f}")
    print(f"model FLOPs/step {flops_step / 1e12:.3f} TFLOP ({flops_step / global_batch / 1e9:.2f} GFLOP/image)")
    if peak:
        mfu = flops_step / dt / (chips * peak * 1e12)
        print(f"MFU {100 * mfu:.1f}% of {peak:.3g} TFLOP/s per chip")
    else:
        print("MFU: unknown peak for this device kind; pass --peak-tflops")


if __name__ == "__main__":
    main()
