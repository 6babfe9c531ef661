"""PNG plots (matplotlib, Agg): ROC curves and CMC curves."""
from __future__ import annotations

import os


def _pyplot():
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_roc(curves: dict, path: str, title: str = "ROC", log_x: bool = True, xlim=(1e-6, 1.0)) -> str:
    """``curves``: label -> (fpr, tpr[, auc]). Log-scale FAR axis as in the IJB plots."""
    plt = _pyplot()
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
    _save(fig, path)
    plt.close(fig)
    return path


def plot_cmc(curves: dict, path: str, title: str = "CMC") -> str:
    """``curves``: label -> {rank: identification rate}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, points in curves.items():
        ks = sorted(points)
        ax.plot(ks, [points[k] for k in ks], marker="o", label=label)
    ax.set_xlabel("Rank")
    ax.set_ylabel("Identification rate")
    ax.set_title(title)
    ax.grid(True, linestyle=":", alpha=0.5)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path
