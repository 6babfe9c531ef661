"""Inference throughput of the exported ONNX model (onnxruntime, CPU) against the JAX jit model and the
PyTorch reference, same weights, batch and machine, measured in one run.

    python3 benchmarks/bench_export.py --arch ir_18 --batch 8 --iters 5

Prints images/s for each and the ratios against the PyTorch reference (the baseline); also the largest
embedding difference of each against the JAX model (float32, and the float16 ONNX variant).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from harness import arch_name, positive_int, run_main, timed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=arch_name, default="ir_18")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--iters", type=positive_int, default=5)
    args = p.parse_args(argv)

    import jax
    import onnxruntime as ort
    import torch

    from adaface_jax.compile_options import compiler_options
    from adaface_jax.convert.convert import state_dict_to_variables
    from adaface_jax.deploy.onnx_export import build_onnx_model
    from adaface_jax.models import build_model
    from tests.support.torch_reference import build_backbone, randomize_

    tm = randomize_(build_backbone(args.arch)).eval()
    _, _, variables, _, _ = state_dict_to_variables({"model." + k: v for k, v in tm.state_dict().items()})
    model = build_model(args.arch)
    jvars = jax.device_put(variables)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=compiler_options())  # as extract_features
    x = np.random.RandomState(0).uniform(-1, 1, (args.batch, 112, 112, 3)).astype(np.float32)
    xj = jax.device_put(x)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    sessions = {dtype: ort.InferenceSession(build_onnx_model(variables, args.arch, dtype=dtype).SerializeToString(),
                                            providers=["CPUExecutionProvider"])
                for dtype in ("float32", "float16")}

    ref_emb = np.asarray(fwd(jvars, xj)[0])
    t_jax = timed(lambda: jax.block_until_ready(fwd(jvars, xj)), args.iters)
    with torch.no_grad():
        t_torch = timed(lambda: tm(xt), args.iters)
    t_ort = {k: timed(lambda s=s: s.run(None, {"input": x}), args.iters) for k, s in sessions.items()}
    diff = {k: float(np.max(np.abs(s.run(None, {"input": x})[0] - ref_emb))) for k, s in sessions.items()}
    print(f"{args.arch} batch {args.batch}, CPU, {os.cpu_count()} cores:")
    print(f"  pytorch reference (baseline):  {args.batch / t_torch:8.1f} images/s")
    print(f"  jax jit:                       {args.batch / t_jax:8.1f} images/s   {t_torch / t_jax:5.2f}x")
    for k, t in t_ort.items():
        print(f"  onnxruntime {k:8s}:          {args.batch / t:8.1f} images/s   {t_torch / t:5.2f}x   "
              f"max |emb - jax| {diff[k]:.1e}")


if __name__ == "__main__":
    run_main(main)
