"""Training-step throughput: our jitted JAX step vs the PyTorch reference, same model, batch and machine.

    python benchmarks/bench_train_step.py --archs ir_18 ir_50 --batch 16 --iters 3 --rounds 3

Both sides run one full step (train-mode backbone, AdaFace head, cross-entropy, backward, SGD with
the original's parameter groups) in float32 on the CPU. The JAX step is the trainer builder's, once per
``--cpu-convolutions`` choice (``config.cpu_convolutions``: XLA's Eigen convolution kernels with the
backbone's CPU backward rewrites, the default, and XLA's default YNNPACK kernels with autodiff's
backward); ``--autodiff-backward`` adds the Eigen side without the rewrites (``IResNet.cpu_backward`` off).
Every side is compiled and warmed up first; then ``--rounds`` rounds each time ``--iters`` steps of every
side in turn, so a slow patch of a shared machine hits all sides alike.
Printed: the median images/s of each side and its ratio to PyTorch's median; nothing is asserted. The JAX
step runs on a mesh over the local devices (1 CPU device unless XLA_FLAGS asks for more); PyTorch uses its
default intra-op threads.
"""
from __future__ import annotations

import argparse
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    harness.run_main(main)
