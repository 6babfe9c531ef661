"""Eval-mode forward throughput: our jitted Flax IResNet vs the PyTorch reference (baseline, same run).

    python3 benchmarks/bench_forward.py --arch ir_18 --batch 8 --iters 5 [--dtype bfloat16]

Prints images/s for both and the ratio ours/baseline.  Needs torch (tests/torch_reference.py).
"""
from __future__ import annotations

import argparse

import numpy as np

from harness import timed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ir_18")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    from adaface_jax.convert.convert import state_dict_to_variables
    from adaface_jax.models import build_model
    from torch_reference import build_backbone, randomize_

    tm = randomize_(build_backbone(args.arch)).eval()
    _, _, variables, _, _ = state_dict_to_variables({"model." + k: v for k, v in tm.state_dict().items()})
    variables = jax.device_put(variables)
    model = build_model(args.arch, dtype=getattr(jnp, args.dtype))
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = np.random.RandomState(0).uniform(-1, 1, (args.batch, 112, 112, 3)).astype(np.float32)
    xj = jax.device_put(x)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    t_ours = timed(lambda: jax.block_until_ready(fwd(variables, xj)), args.iters)
    with torch.no_grad():
        t_base = timed(lambda: tm(xt), args.iters)
    print(f"{args.arch} batch {args.batch} on {jax.default_backend()} ({args.dtype}):")
    print(f"  pytorch reference (baseline): {args.batch / t_base:8.1f} images/s")
    print(f"  flax jit (ours):              {args.batch / t_ours:8.1f} images/s")
    print(f"  ratio ours/baseline:          {t_base / t_ours:8.2f}x")


if __name__ == "__main__":
    main()
