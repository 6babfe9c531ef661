"""Images/s per chip and model-FLOPs utilisation of the training step on an accelerator.

    # on a GPU/TPU host (bfloat16 backbone, ir_101, WebFace12M-sized head):
    python benchmarks/device_train_mfu.py --arch ir_101 --per-chip-batch 128 --num-classes 617970
    # proof that it runs, on CPU with tiny settings:
    python benchmarks/device_train_mfu.py --arch ir_18 --per-chip-batch 2 --num-classes 64 --steps 2 \
        --peak-tflops 0.1 --precision float32

The step is the trainer's (``adaface_jax.train.setup.build_trainer``: the recipe's AdaFace head, SGD,
class-sharded kernel, ``--sample-rate`` for Partial FC).  The config comes from ``configs.common`` when
ml_collections is importable, else from a plain attribute dict with the same fields (so it runs where
only JAX, flax, optax and orbax are installed: no TensorFlow, no ml_collections).

FLOPs per step are ``program_cost.model_flops`` of the step: its convolutions and matrix products, counted
on the jaxpr (XLA's compiled GPU program leaves cuDNN/cuBLAS calls out of its own count).
MFU = achieved FLOP/s / (chips x peak FLOP/s per chip).  The peak comes from --peak-tflops or a small
table of dense bf16 peaks by device kind.  ``--forward`` also times the eval-mode forward pass;
peak memory is the device's ``memory_stats()['peak_bytes_in_use']`` where the backend reports it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402  (the repository on sys.path; needs nothing beyond the standard library)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                    "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "L4": 121.0}


def peak_tflops(kind: str):
    for key, v in PEAK_BF16_TFLOPS.items():
        if key.lower() in kind.lower():
            return v
    return None


class AttrDict(dict):
    """The few ConfigDict behaviours the trainer uses (attribute access, ``get``, ``in``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def plain_config(arch: str, num_classes: int) -> AttrDict:
    """The fields of ``configs.common.get_base_config`` that the trainer reads, without ml_collections."""
    return AttrDict(
        seed=42, num_classes=num_classes, global_batch_size=512, accum_steps=1, lr=0.1, lr_milestones=(12, 20, 24),
        lr_gamma=0.1, warmup_epochs=0.0, momentum=0.9, weight_decay=5e-4, precision="bfloat16",
        per_device_stats=False, cpu_convolutions="eigen",
        model=AttrDict(arch=arch, embedding_size=512, width=64, dropout_rate=0.4),
        head=AttrDict(name="adaface", m=0.4, h=0.333, s=64.0, t_alpha=0.01, sample_rate=1.0),
        loss_scale=AttrDict(init=2.0 ** 16, growth_interval=2000, growth_factor=2.0, backoff_factor=0.5),
        data=AttrDict(image_size=112))


def make_config(arch: str, num_classes: int):
    try:
        from configs.common import get_base_config  # noqa: PLC0415  (needs ml_collections)
        return get_base_config(arch=arch, num_classes=num_classes), "configs.common"
    except ImportError:
        return plain_config(arch, num_classes), "plain dict (no ml_collections)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=harness.arch_name, default="ir_50")
    ap.add_argument("--per-chip-batch", type=harness.positive_int, default=128)
    ap.add_argument("--num-classes", type=harness.positive_int, default=205990)
    ap.add_argument("--steps", type=harness.positive_int, default=20)
    ap.add_argument("--warmup", type=harness.positive_int, default=3)
    ap.add_argument("--peak-tflops", type=harness.positive_float, default=None, help="peak FLOP/s per chip in TFLOP/s")
    ap.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--float32", action="store_true", help="same as --precision float32")
    ap.add_argument("--width", type=harness.positive_int, default=64, help="first-stage channels (64 = the released models)")
    ap.add_argument("--image-size", type=harness.positive_int, default=112)
    ap.add_argument("--sample-rate", type=harness.sample_rate, default=1.0, help="Partial FC sample rate")
    ap.add_argument("--forward", action="store_true", help="also time the eval-mode forward pass")
    ap.add_argument("--flops-only", action="store_true",
                    help="print the step's model FLOPs for these settings and stop: nothing is allocated, compiled "
                         "or run (for MFU from a step time measured on another host)")
    args = ap.parse_args(argv)
    precision = "float32" if args.float32 else args.precision

    import jax  # noqa: PLC0415

    from adaface_jax import parallel  # noqa: PLC0415
    from adaface_jax.errors import ConfigError  # noqa: PLC0415
    from adaface_jax.train.program_cost import model_flops  # noqa: PLC0415
    from adaface_jax.train.setup import build_trainer  # noqa: PLC0415

    mesh = parallel.make_mesh()
    chips = mesh.devices.size
    kind = jax.devices()[0].device_kind
    global_batch = args.per_chip_batch * chips
    config, source = make_config(args.arch, args.num_classes)
    config.precision = precision
    config.global_batch_size = global_batch
    config.model.width = args.width
    config.data.image_size = args.image_size
    config.head.sample_rate = args.sample_rate
    try:
        trainer = build_trainer(config, mesh, steps_per_epoch=1000, abstract=args.flops_only)
    except ConfigError as e:
        ap.error(str(e))
    if args.flops_only:
        bs = parallel.batch_sharding(mesh)
        shape = (global_batch, args.image_size, args.image_size, 3)
        abstract_batch = {"image": jax.ShapeDtypeStruct(shape, np.float32, sharding=bs),
                          "label": jax.ShapeDtypeStruct(shape[:1], np.int32, sharding=bs)}
        flops = model_flops(trainer.step, trainer.state, abstract_batch)
        print(f"{args.arch} {precision}; {args.num_classes} classes; global batch {global_batch}; sample rate "
              f"{args.sample_rate:g}: model FLOPs/step {flops / 1e12:.3f} TFLOP ({flops / global_batch / 1e9:.2f} "
              f"GFLOP/image)")
        return 0
    state, size = trainer.state, args.image_size
    rs = np.random.RandomState(jax.process_index())
    local = global_batch // jax.process_count()
    batch = parallel.host_to_global({"image": rs.uniform(-1, 1, (local, size, size, 3)).astype(np.float32),
                                     "label": rs.randint(0, args.num_classes, local).astype(np.int32)}, mesh)
    t = time.perf_counter()
    compiled = trainer.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    flops_step = model_flops(trainer.step, state, batch)

    warmup_losses = []
    for _ in range(args.warmup):
        state, m = compiled(state, batch)
        warmup_losses.append(m["loss"])
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(args.steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t) / args.steps

    peak = args.peak_tflops or peak_tflops(kind)
    print(f"device {kind} x{chips}; {args.arch} {precision}; {args.num_classes} classes (padded "
          f"{trainer.padded_classes}); global batch {global_batch}; sample rate {args.sample_rate:g}; config {source}")
    # The same batch every step: the loss falls from the first step's as the step fits it (it trains).
    print(f"compile {compile_s:.1f} s; step {dt * 1e3:.1f} ms; loss {float(warmup_losses[0]):.3f} -> "
          f"{float(m['loss']):.3f}")
    print(f"images/s total {global_batch / dt:.1f}; per chip {global_batch / dt / chips:.1f}")
    print(f"model FLOPs/step {flops_step / 1e12:.3f} TFLOP ({flops_step / global_batch / 1e9:.2f} GFLOP/image)")
    if peak:
        mfu = flops_step / dt / (chips * peak * 1e12)
        print(f"MFU {100 * mfu:.1f}% of {peak:.3g} TFLOP/s per chip")
    else:
        print("MFU: unknown peak for this device kind; pass --peak-tflops")

    if args.forward:
        variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
        model = trainer.eval_model
        fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
        images = batch["image"]
        jax.block_until_ready(fwd(variables, images))
        t = time.perf_counter()
        for _ in range(args.steps):
            out = fwd(variables, images)
        jax.block_until_ready(out)
        fdt = (time.perf_counter() - t) / args.steps
        print(f"forward images/s total {global_batch / fdt:.1f}; per chip {global_batch / fdt / chips:.1f}")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"peak memory {stats['peak_bytes_in_use'] / 2 ** 30:.2f} GiB of "
              f"{stats.get('bytes_limit', 0) / 2 ** 30:.1f} GiB (device 0)")
    else:
        print("peak memory: not reported by this backend")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
