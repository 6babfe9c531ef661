"""PNG plots (matplotlib, Agg): ROC curves, CMC curves, norm against quality.

Each function returns the PNG as bytes; the caller writes it (``adaface_jax.io.write_bytes``, the
project's one atomic writer), so this package writes no files."""
from __future__ import annotations

import io

import numpy as np
from scipy.stats import spearmanr


def pyplot():
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def plot_roc(curves: dict, title: str = "ROC", log_x: bool = True, xlim=(1e-6, 1.0)) -> bytes:
    """``curves``: label -> (fpr, tpr[, auc]). Log-scale FAR axis as in the IJB plots."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, curve in curves.items():
        fpr, tpr = curve[0], curve[1]
        name = f"{label} (AUC = {curve[2]:.4f})" if len(curve) > 2 else label
        ax.plot(fpr, tpr, lw=1.5, label=name)
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(*xlim)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(title)
    ax.grid(True, which="both", linestyle=":", alpha=0.5)
    ax.legend(loc="lower right", fontsize=8)
    return figure_png(fig)


def plot_cmc(curves: dict, title: str = "CMC") -> bytes:
    """``curves``: label -> {rank: identification rate}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, points in curves.items():
        ks = sorted(points)
        ax.plot(ks, [points[k] for k in ks], marker="o", label=label)
    ax.set_xlabel("Rank")
    ax.set_ylabel("Identification rate")
    ax.set_title(title)
    ax.grid(True, linestyle=":", alpha=0.5)
    ax.legend(loc="lower right", fontsize=8)
    return figure_png(fig)


def plot_norm_vs_quality(norms, quality, title: str = "Feature norm vs image quality",
                         reference=None, label: str = "model") -> bytes:
    """Scatter of feature norms against an image-quality label, with the binned mean -- the
    AdaFace paper's observation that the norm is a proxy for image quality.

    ``reference``: optional (norms, label) of a second model (e.g. untrained), drawn in its own
    panel on the left (norm scales of different models are not comparable).
    """

    plt = pyplot()
    quality = np.asarray(quality, float).reshape(-1)
    series = [(np.asarray(norms, float).reshape(-1), label, "tab:blue")]
    if reference is not None:
        series.insert(0, (np.asarray(reference[0], float).reshape(-1), reference[1], "0.4"))
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.2), squeeze=False)
    bins = np.linspace(quality.min(), quality.max(), 9)
    idx = np.clip(np.digitize(quality, bins) - 1, 0, len(bins) - 2)
    used = [i for i in range(len(bins) - 1) if np.any(idx == i)]
    for ax, (n, label, colour) in zip(axes[0], series):
        ax.scatter(quality, n, s=6, alpha=0.35, color=colour)
        ax.plot([(bins[i] + bins[i + 1]) / 2 for i in used], [n[idx == i].mean() for i in used], "-o", color=colour,
                lw=2, label="binned mean")
        ax.set_title(f"{label}: Spearman {spearmanr(quality, n).statistic:+.2f}", fontsize=10)
        ax.set_xlabel("image quality (1 = clean, 0 = most degraded)")
        ax.set_ylabel("feature norm ||x||")
        ax.grid(True, linestyle=":", alpha=0.5)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    return figure_png(fig)
