"""Eval-mode forward throughput: our jitted Flax IResNet vs the PyTorch reference (baseline, same run).

    python3 benchmarks/bench_forward.py --arch ir_18 --batch 8 --iters 5 --rounds 3 [--dtype bfloat16]

The Flax forward is compiled once per ``--cpu-convolutions`` choice (``adaface_jax.compile_options``, as
the feature extractor compiles it: XLA's Eigen convolution kernels by default, or XLA's defaults). Every
side is warmed up first; then ``--rounds`` rounds each time ``--iters`` calls of every side in turn.
Prints the median images/s of each side and its ratio to the PyTorch reference's median. Needs torch
(tests/support/torch_reference.py).
"""
from __future__ import annotations

import argparse

import numpy as np

from harness import arch_name, positive_int, run_main, timed
from adaface_jax.compile_options import CPU_CONVOLUTIONS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=arch_name, default="ir_18")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--iters", type=positive_int, default=5)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cpu-convolutions", nargs="+", default=list(CPU_CONVOLUTIONS), choices=CPU_CONVOLUTIONS)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    from adaface_jax.compile_options import compiler_options
    from adaface_jax.convert.convert import state_dict_to_variables
    from adaface_jax.models import build_model
    from tests.support.torch_reference import build_backbone, randomize_

    tm = randomize_(build_backbone(args.arch)).eval()
    _, _, variables, _, _ = state_dict_to_variables({"model." + k: v for k, v in tm.state_dict().items()})
    variables = jax.device_put(variables)
    model = build_model(args.arch, dtype=getattr(jnp, args.dtype))
    x = np.random.RandomState(0).uniform(-1, 1, (args.batch, 112, 112, 3)).astype(np.float32)
    xj = jax.device_put(x)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    sides = {}
    for choice in args.cpu_convolutions:
        fwd = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=compiler_options(choice))
        sides[f"flax jit, {choice}"] = lambda fwd=fwd: jax.block_until_ready(fwd(variables, xj))

    def torch_forward():
        with torch.no_grad():
            tm(xt)

    sides["pytorch reference"] = torch_forward
    rates = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            rates[name].append(args.batch / timed(fn, args.iters))
    base = float(np.median(rates["pytorch reference"]))
    print(f"{args.arch} batch {args.batch} on {jax.default_backend()} ({args.dtype}), {args.rounds} rounds of "
          f"{args.iters} calls per side, medians:")
    for name, r in rates.items():
        med = float(np.median(r))
        print(f"  {name:28s} {med:8.1f} images/s   {med / base:5.2f}x the PyTorch reference")


if __name__ == "__main__":
    run_main(main)
