"""XLA compiler options for the programs we jit: on the CPU backend, which kernels run the convolutions.

XLA:CPU (jaxlib 0.10) hands every convolution to a YNNPACK fusion by default. Summed over the IResNet's
convolution shapes on x86 (batch 16, ``benchmarks/bench_conv_layers.py``), YNNPACK took 3.7-3.8x the time
of XLA's own Eigen kernels for the weight gradients (6.0-6.3x at 112x112), 1.5x for the forward pass and
1.1-1.2x for the input gradients (two runs); its weight gradients also carry about ten times the float32 rounding error.
``benchmarks/bench_train_step.py`` times the whole step.

``'eigen'`` keeps YNNPACK for the dots and reductions it runs by default and drops only its convolution
fusions (``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``), so XLA runs the convolutions with Eigen (leaving
YNNPACK only the dots is slower: the BatchNorm reductions become ``reduce-window`` loops). ``'xla_default'``
compiles with XLA's defaults. Accelerators get no options: the choice is a CPU one.

With ``'eigen'`` the trainer builder also builds the backbone with ``cpu_backward`` (``cpu_backward``
below): two rewrites of the backward pass for the same kernels, each a plain convolution or a short
reduction where autodiff's form is slow on XLA:CPU. Strided convolutions' input gradients go one stride
phase at a time (``adaface_jax/models/conv.py``): Eigen has no kernel for autodiff's zero-dilated
convolution and XLA runs it with a generic loop. BatchNorm takes its closed-form gradient
(``adaface_jax/models/layers.py``). ``benchmarks/bench_train_step.py --autodiff-backward`` times the step
with and without them.

One home for the choice: the trainer builder (``config.cpu_convolutions``), the feature extractor and the
study's probes ask ``compiler_options`` for the dict to pass to ``jax.jit``.
"""
from __future__ import annotations

from typing import Optional

import jax

from adaface_jax.errors import ConfigError

CPU_CONVOLUTIONS = ("eigen", "xla_default")
DEFAULT_CPU_CONVOLUTIONS = "eigen"

# XLA's default YNNPACK fusion kinds on CPU (jaxlib 0.10: dots, reductions, convolutions) without the
# convolutions. The compiled step keeps every YNNPACK dot and reduction fusion it had by default.
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
