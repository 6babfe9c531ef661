"""XLA compiler options for the programs we jit: on the CPU backend, which kernels run the convolutions.

XLA:CPU hands every convolution to a YNNPACK fusion by default. For the IResNet's convolution shapes its
kernels are slower than XLA's own Eigen kernels, most of all for the weight gradients, so the default
choice, ``'eigen'``, drops only YNNPACK's convolution fusions (``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``)
and keeps the dots and reductions it runs by default: XLA then runs the convolutions with Eigen. Leaving
YNNPACK only the dots would be slower, because the BatchNorm reductions become ``reduce-window`` loops.
``'xla_default'`` compiles with XLA's defaults. Accelerators get no options: the choice is a CPU one.

With ``'eigen'`` the trainer builder also builds the backbone with ``cpu_backward`` (below): two rewrites
of the backward pass for the same kernels, each a plain convolution or a short reduction where autodiff's
form is slow on XLA:CPU. Strided convolutions' input gradients go one stride phase at a time
(``adaface_jax/models/conv.py``): Eigen has no kernel for autodiff's zero-dilated convolution and XLA runs
it with a generic loop. BatchNorm takes its closed-form gradient (``adaface_jax/models/layers.py``).

The figures behind these choices, with their commands (``benchmarks/bench_conv_layers.py``,
``benchmarks/bench_train_step.py [--autodiff-backward]``), are in docs/performance.md ("The CPU training
step"); ``tests/adaface_jax/test_compile_options.py`` checks the compiled programs.

One home for the choice: the trainer builder (``config.cpu_convolutions``), the feature extractor and the
study's probes ask ``compiler_options`` for the dict to pass to ``jax.jit``.
"""
from __future__ import annotations

from typing import Optional

import jax

from adaface_jax.errors import ConfigError

CPU_CONVOLUTIONS = ("eigen", "xla_default")
DEFAULT_CPU_CONVOLUTIONS = "eigen"

# XLA's default YNNPACK fusion kinds on CPU (dots, reductions, convolutions) without the convolutions, so the
# compiled program keeps every YNNPACK dot and reduction fusion it has by default.
_YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def check_cpu_convolutions(choice: str) -> str:
    if choice not in CPU_CONVOLUTIONS:
        raise ConfigError(f"config.cpu_convolutions={choice!r}: expected one of {CPU_CONVOLUTIONS}")
    return choice


def compiler_options(cpu_convolutions: str = DEFAULT_CPU_CONVOLUTIONS,
                     platform: Optional[str] = None) -> Optional[dict]:
    """``compiler_options`` for ``jax.jit`` on ``platform`` (default: JAX's default backend): the Eigen
    convolutions on CPU for ``'eigen'``, None (XLA's defaults) otherwise."""
    check_cpu_convolutions(cpu_convolutions)
    platform = platform or jax.default_backend()
    if platform != "cpu" or cpu_convolutions == "xla_default":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": _YNN_WITHOUT_CONVOLUTIONS}


def cpu_backward(cpu_convolutions: str = DEFAULT_CPU_CONVOLUTIONS, platform: Optional[str] = None) -> bool:
    """Whether the backbone is built with its CPU backward rewrites (``IResNet.cpu_backward``): on the CPU
    backend with ``'eigen'``; ``'xla_default'`` and accelerators keep autodiff's backward."""
    check_cpu_convolutions(cpu_convolutions)
    return (platform or jax.default_backend()) == "cpu" and cpu_convolutions == "eigen"
