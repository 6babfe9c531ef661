"""adaface-jax: AdaFace face recognition in JAX/Flax.

Public entry points (imported lazily so ``import adaface_jax`` stays cheap):
  build_model(name)                      -- Flax IResNet / IR-SE backbones
  load_pretrained(path, arch=None)       -- a released PyTorch .ckpt or a converted directory
  to_input(rgb_uint8)                    -- aligned RGB face -> normalised BGR model input
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "build_model": "adaface_jax.models",
    "heads": "adaface_jax.heads",
    "load_pretrained": "adaface_jax.inference",
    "to_input": "adaface_jax.inference",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if name == "heads" else getattr(module, name)
    raise AttributeError(f"module 'adaface_jax' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
