"""Backbones: ``build_model(name)`` for ir_18/34/50/101/152/200, ir_se_50/101/152/200, and ``tiny`` (a
few-layer stand-in with the same contract, for smoke runs and tests)."""
from adaface_jax.models.iresnet import ARCHS, IResNet, stage_specs, unit_strides
from adaface_jax.models.iresnet import build_model as _build_iresnet
from adaface_jax.models.tiny import TinyBackbone

MODEL_NAMES = tuple(ARCHS) + ("tiny",)


def build_model(name: str, **overrides):
    """``build_model("ir_50")`` -> the IResNet of that name; ``"tiny"`` -> ``TinyBackbone``. Keyword
    overrides (dtype, bn_groups, width, embedding_size, ...) go to the module; fields a model does not
    have are an error."""
    if name == "tiny":
        return TinyBackbone(**overrides)
    return _build_iresnet(name, **overrides)


__all__ = ["ARCHS", "MODEL_NAMES", "IResNet", "TinyBackbone", "build_model", "stage_specs", "unit_strides"]
