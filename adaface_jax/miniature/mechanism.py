"""What a margin head does to each sample of a batch, in numpy: the margin scaler, the probability of the true
class and the gradient scale, and how they split over the batch's quality thirds (the study's gate).

For a target logit ``s * f(cos theta_y)`` and the softmax cross-entropy, the loss's derivative with respect to
``cos theta_y`` is ``-s (1 - p_y) df/dcos`` (AdaFace, Kim et al. CVPR 2022, Sec. 3.1): that product is the
sample's *gradient scale*. ``f`` is, as in the original head.py:

* CosFace: ``cos theta - m``, slope 1;
* ArcFace: ``cos(clip(theta + m))``, slope ``sin(theta') / sin(theta)``;
* AdaFace: ``cos(clip(theta - m g)) - m - m g`` with g the margin scaler (paper Eq. 5-7), slope
  ``sin(theta') / sin(theta)``; a clipped angle has slope 0.
"""
from __future__ import annotations

import numpy as np

# cosine clamp and angle clip of each head in the original head.py (and adaface_jax.heads)
HEAD_EPS = {"adaface": 1e-3, "arcface": 1e-4, "cosface": 1e-4}


def scaler_from(values, mean: float, std: float, h: float, eps: float = 1e-3) -> np.ndarray:
    """AdaFace's margin scaler ``clip(h (v - mean) / (std + eps), -1, 1)`` (paper Eq. 6, ``heads.margin_scaler``)."""
    return np.clip(h * (np.asarray(values, np.float64) - mean) / (std + eps), -1.0, 1.0)


def standardised_scaler(values, h: float, eps: float = 1e-3) -> np.ndarray:
    """The scaler of ``values`` against their own mean and unbiased std (the oracle's quality, or norms before
    any statistics exist)."""
    v = np.asarray(values, np.float64)
    return scaler_from(v, v.mean(), v.std(ddof=1), h, eps)


def _angles(head: str, cos_y, scaler, m: float):
    eps = HEAD_EPS[head]
    theta = np.arccos(np.clip(np.asarray(cos_y, np.float64), -1 + eps, 1 - eps))
    if head == "arcface":
        shifted = theta + m
    elif head == "adaface":
        shifted = theta - m * np.asarray(scaler, np.float64)
    else:
        shifted = theta
    clipped = np.clip(shifted, eps, np.pi - eps)
    return theta, clipped, clipped != shifted


def target_value(head: str, cos_y, scaler, m: float) -> np.ndarray:
    """``f(cos theta_y)``: the target logit divided by s."""
    _, angle, _ = _angles(head, cos_y, scaler, m)
    if head == "cosface":
        return np.clip(np.asarray(cos_y, np.float64), -1 + HEAD_EPS[head], 1 - HEAD_EPS[head]) - m
    if head == "arcface":
        return np.cos(angle)
    return np.cos(angle) - m - m * np.asarray(scaler, np.float64)


def target_slope(head: str, cos_y, scaler, m: float) -> np.ndarray:
    """``df/dcos theta_y`` of each sample (0 where the head clips the angle)."""
    if head == "cosface":
        return np.ones(np.shape(cos_y))
    theta, angle, clipped = _angles(head, cos_y, scaler, m)
    return np.where(clipped, 0.0, np.sin(angle) / np.sin(theta))


def true_class_probability(cos, labels, head: str | None, scaler, m: float, s: float) -> np.ndarray:
    """p_y of the softmax over ``s * cos`` with the head's margin on the target (``head=None``: no margin)."""
    cos = np.asarray(cos, np.float64)
    rows = np.arange(cos.shape[0])
    logits = s * cos
    if head is not None:
        eps = HEAD_EPS[head]
        logits = s * np.clip(cos, -1 + eps, 1 - eps)
        logits[rows, labels] = s * target_value(head, cos[rows, labels], scaler, m)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p[rows, labels] / p.sum(axis=1)


def gradient_scale(cos, labels, head: str, scaler, m: float, s: float) -> np.ndarray:
    """``s (1 - p_y) df/dcos theta_y`` of each sample."""
    cos_y = np.asarray(cos, np.float64)[np.arange(len(labels)), labels]
    p_y = true_class_probability(cos, labels, head, scaler, m, s)
    return s * (1.0 - p_y) * target_slope(head, cos_y, scaler, m)


def quality_thirds(quality) -> np.ndarray:
    """0, 1 or 2 for the lowest, middle and highest third of the samples by quality (ties in sample order)."""
    order = np.argsort(np.asarray(quality), kind="stable")
    third = np.empty(order.size, np.int64)
    third[order] = np.arange(order.size) * 3 // order.size
    return third


def third_shares(values, thirds) -> list[float]:
    """Each third's share of ``values``' total."""
    values = np.asarray(values, np.float64)
    total = values.sum()
    return [float(values[thirds == k].sum() / total) if total else float("nan") for k in range(3)]
