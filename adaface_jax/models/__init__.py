"""Backbones: ``build_model(name)`` for ir_18/34/50/101/152/200 and ir_se_50/101/152/200."""
from adaface_jax.models.iresnet import ARCHS, IResNet, build_model, stage_specs, unit_strides

__all__ = ["ARCHS", "IResNet", "build_model", "stage_specs", "unit_strides"]
