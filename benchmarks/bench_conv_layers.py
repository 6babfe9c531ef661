"""The IResNet's convolutions one by one on the CPU: forward, input gradient and weight gradient, each jitted
alone, with XLA's Eigen kernels (``config.cpu_convolutions='eigen'``), with XLA's default YNNPACK fusions, and
with PyTorch (oneDNN) as the baseline measured in the same run.

    python3 benchmarks/bench_conv_layers.py --batch 16 --iters 5

One row per layer shape of an ir_18/ir_50 (input size, channels in -> out, kernel, stride); milliseconds per
call (median of ``--iters`` after a warm-up), and a last row with the sums and the ratio of each side's
total to PyTorch's. Nothing is asserted.
"""
from __future__ import annotations

import argparse

import numpy as np

from harness import positive_int, run_main, timed_median  # (also puts the repository on sys.path)

# (input H = W, C_in, C_out, kernel, stride): the stem, each stage's first block (3x3 stride 2 and the 1x1
# stride-2 shortcut) and its repeated 3x3 convolutions.
LAYERS = [(112, 3, 64, 3, 1), (112, 64, 64, 3, 1), (112, 64, 64, 3, 2), (112, 64, 64, 1, 2),
          (56, 64, 64, 3, 1), (56, 64, 128, 3, 1), (56, 128, 128, 3, 2), (56, 64, 128, 1, 2),
          (28, 128, 128, 3, 1), (28, 128, 256, 3, 1), (28, 256, 256, 3, 2), (28, 128, 256, 1, 2),
          (14, 256, 256, 3, 1), (14, 256, 512, 3, 1), (14, 512, 512, 3, 2), (14, 256, 512, 1, 2),
          (7, 512, 512, 3, 1)]


def median_ms(fn, iters):
    return 1e3 * timed_median(fn, iters)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=positive_int, default=16)
    ap.add_argument("--iters", type=positive_int, default=5)
    args = ap.parse_args(argv)

    import jax
    import torch
    from jax import lax

    from adaface_jax.compile_options import CPU_CONVOLUTIONS, compiler_options

    dn = ("NHWC", "HWIO", "NHWC")
    rs = np.random.RandomState(0)
    cols = [f"{c} {p}" for c in CPU_CONVOLUTIONS for p in ("fwd", "dx", "dW")] + ["torch fwd", "torch dx", "torch dW"]
    print(f"batch {args.batch}, float32, ms per call (median of {args.iters}); torch threads {torch.get_num_threads()}")
    print(f"{'layer (H, Cin, Cout, k, s)':28s}" + "".join(f"{c:>15s}" for c in cols))
    totals = np.zeros(len(cols))
    for h, ci, co, k, s in LAYERS:
        p = k // 2
        x = rs.uniform(-1, 1, (args.batch, h, h, ci)).astype(np.float32)
        w = (rs.standard_normal((k, k, ci, co)) * 0.05).astype(np.float32)
        ho = (h + 2 * p - k) // s + 1
        dy = rs.standard_normal((args.batch, ho, ho, co)).astype(np.float32)

        def conv(a, b, s=s, p=p):
            return lax.conv_general_dilated(a, b, (s, s), ((p, p), (p, p)), dimension_numbers=dn)

        row = []
        for choice in CPU_CONVOLUTIONS:
            opts = compiler_options(choice)
            fwd = jax.jit(conv, compiler_options=opts)
            dx = jax.jit(lambda a, b, g, conv=conv: jax.vjp(lambda a_: conv(a_, b), a)[1](g)[0], compiler_options=opts)
            dw = jax.jit(lambda a, b, g, conv=conv: jax.vjp(lambda b_: conv(a, b_), b)[1](g)[0], compiler_options=opts)
            xj, wj, gj = jax.device_put(x), jax.device_put(w), jax.device_put(dy)
            row += [median_ms(lambda: jax.block_until_ready(fwd(xj, wj)), args.iters),
                    median_ms(lambda: jax.block_until_ready(dx(xj, wj, gj)), args.iters),
                    median_ms(lambda: jax.block_until_ready(dw(xj, wj, gj)), args.iters)]
        tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        tw = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
        tg = torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)))

        def backward(mask):
            return torch.ops.aten.convolution_backward(tg, tx, tw, None, (s, s), (p, p), (1, 1), False, (0, 0), 1, mask)

        with torch.no_grad():
            row += [median_ms(lambda: torch.nn.functional.conv2d(tx, tw, stride=s, padding=p), args.iters),
                    median_ms(lambda: backward((True, False, False)), args.iters),
                    median_ms(lambda: backward((False, True, False)), args.iters)]
        totals += row
        print(f"{str((h, ci, co, k, s)):28s}" + "".join(f"{v:15.1f}" for v in row), flush=True)
    print(f"{'sum':28s}" + "".join(f"{v:15.1f}" for v in totals))
    torch_total = totals[-3:].sum()
    for i, choice in enumerate(CPU_CONVOLUTIONS):
        side = totals[3 * i: 3 * i + 3]
        print(f"{choice}: fwd + dx + dW = {side.sum():.0f} ms, {torch_total / side.sum():.2f}x PyTorch's speed "
              f"(fwd {totals[-3] / side[0]:.2f}x, dx {totals[-2] / side[1]:.2f}x, dW {totals[-1] / side[2]:.2f}x)")


if __name__ == "__main__":
    run_main(main)
