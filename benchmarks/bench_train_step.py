"""Training-step throughput: our jitted JAX step vs the PyTorch reference, same model, batch and machine.

    python benchmarks/bench_train_step.py --archs ir_18 ir_50 --batch 16 --iters 5

Both sides run one full step (train-mode backbone, AdaFace head, cross-entropy, backward, SGD with
the original's parameter groups) in float32 on the CPU; images/s and the JAX/PyTorch ratio are
printed, not asserted.  The JAX step runs on a mesh over the local devices (1 CPU device unless
XLA_FLAGS asks for more); PyTorch uses its default intra-op threads.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def jax_images_per_sec(arch, batch, num_classes, iters, warmup):
    import jax  # noqa: PLC0415

    from adaface_jax import parallel  # noqa: PLC0415
    from adaface_jax.train.setup import build_trainer  # noqa: PLC0415
    from configs.common import get_base_config  # noqa: PLC0415

    # The recipe's step (AdaFace head, the original's SGD groups), in float32, through the trainer builder.
    config = get_base_config(arch=arch, num_classes=num_classes)
    config.precision = "float32"
    mesh = parallel.make_mesh(jax.local_devices())
    trainer = build_trainer(config, mesh, steps_per_epoch=100)
    state, step = trainer.state, trainer.step
    rs = np.random.RandomState(0)
    batch = parallel.host_to_global({"image": rs.uniform(-1, 1, (batch, 112, 112, 3)).astype(np.float32),
                                     "label": rs.randint(0, num_classes, batch).astype(np.int32)}, mesh)
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    for _ in range(warmup):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(iters):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return iters * batch["image"].shape[0] / (time.perf_counter() - t), compile_s


def torch_images_per_sec(arch, batch, num_classes, iters, warmup):
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

    def step():
        emb, norm = model(x)
        loss = nn.functional.cross_entropy(head(emb, norm, y), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    return iters * batch / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["ir_18", "ir_50"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    import torch  # noqa: PLC0415
    print(f"batch {args.batch}, {args.num_classes} classes, float32, CPU; torch threads {torch.get_num_threads()}")
    print(f"{'arch':8s} {'jax img/s':>10s} {'torch img/s':>12s} {'jax/torch':>10s} {'jax compile s':>14s}")
    for arch in args.archs:
        j, compile_s = jax_images_per_sec(arch, args.batch, args.num_classes, args.iters, args.warmup)
        t = torch_images_per_sec(arch, args.batch, args.num_classes, args.iters, args.warmup)
        print(f"{arch:8s} {j:10.2f} {t:12.2f} {j / t:10.2f} {compile_s:14.1f}", flush=True)


if __name__ == "__main__":
    main()
