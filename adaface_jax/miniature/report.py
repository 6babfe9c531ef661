"""The study's runs -> a summary (mean and spread over seeds, paired differences), a Markdown table and PNG
plots: feature norm against quality per head, accuracy by quality bin per head, AdaFace's margin scaler
and norm statistics over training."""
from __future__ import annotations

import numpy as np

from adaface_jax import io
from evaluation.plots import figure_png, pyplot

SUMMARY_FILE = "summary.json"  # the report's marker: written last, removed before anything of a new report
HEAD_COLOURS = {"adaface": "tab:red", "arcface": "tab:blue", "cosface": "tab:green"}


def _mean_std(values) -> list:
    v = np.asarray(values, np.float64)
    return [float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0]


def _runs(result, dataset: str, head: str) -> list:
    return sorted((r for r in result["runs"] if r["dataset"] == dataset and r["head"] == head), key=lambda r: r["seed"])


def summarize(result: dict) -> dict:
    """{dataset: {'heads': {head: metrics}, 'untrained_spearman': [mean, std], 'seeds': [...],
    'identical_batches': bool, 'seeds_differ': bool}}; metrics are [mean, std over seeds]; 'paired' holds
    AdaFace minus each other head, per seed (same initialisation and batches, so the difference is paired)."""
    out = {}
    for dataset in result["datasets"]:
        heads = sorted({r["head"] for r in result["runs"] if r["dataset"] == dataset},
                       key=lambda h: list(HEAD_COLOURS).index(h) if h in HEAD_COLOURS else 99)
        summary = {"heads": {}}
        for head in heads:
            runs = _runs(result, dataset, head)
            bins = np.array([[b["accuracy"] for b in r["bins"]] for r in runs])
            fars = sorted(runs[0]["bins"][0]["tar"], key=float)
            tar = {far: np.array([[b["tar"][far] for b in r["bins"]] for r in runs]) for far in fars}
            summary["heads"][head] = {
                "seeds": [r["seed"] for r in runs],
                "spearman": _mean_std([r["spearman"] for r in runs]),
                "accuracy_by_bin": [_mean_std(bins[:, b]) for b in range(bins.shape[1])],
                "lq_accuracy": _mean_std(bins[:, 0]), "hq_accuracy": _mean_std(bins[:, -1]),
                "lq_tar": {far: _mean_std(t[:, 0]) for far, t in tar.items()},
                "hq_tar": {far: _mean_std(t[:, -1]) for far, t in tar.items()},
                "final_loss": _mean_std([np.mean(r["history"]["loss"][-10:]) for r in runs]),
                "train_s": float(sum(r["train_s"] for r in runs)),
            }
        if "adaface" in summary["heads"]:
            ada = {r["seed"]: r for r in _runs(result, dataset, "adaface")}
            for head in heads:
                if head == "adaface":
                    continue
                pairs = [(ada[r["seed"]], r) for r in _runs(result, dataset, head) if r["seed"] in ada]
                summary["heads"][head]["adaface_minus_this"] = {
                    "lq_accuracy": [a["bins"][0]["accuracy"] - o["bins"][0]["accuracy"] for a, o in pairs],
                    "hq_accuracy": [a["bins"][-1]["accuracy"] - o["bins"][-1]["accuracy"] for a, o in pairs],
                    "spearman": [a["spearman"] - o["spearman"] for a, o in pairs]}
        digests = {}
        for r in result["runs"]:
            if r["dataset"] == dataset:
                digests.setdefault(r["seed"], set()).add(r["batch_digest"])
        summary["seeds"] = sorted(digests)
        summary["identical_batches"] = all(len(d) == 1 for d in digests.values())
        summary["seeds_differ"] = len({next(iter(d)) for d in digests.values()}) == len(digests) > 1
        untrained = list(result["datasets"][dataset]["untrained"].values())
        summary["untrained_spearman"] = _mean_std(untrained)
        out[dataset] = summary
    return out


def _pm(ms, digits=3) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def table_markdown(summary: dict, far: str | None = None) -> str:
    """One row per (dataset, head): Spearman(norm, quality), LQ/HQ 10-fold accuracy and TAR@FAR, mean ± std
    over seeds."""
    lines = []
    for dataset, s in summary.items():
        heads = s["heads"]
        first = next(iter(heads.values()))
        use_far = far if far is not None else sorted(first["lq_tar"], key=float)[0]
        if not lines:
            lines += [f"| data | head | Spearman(norm, quality) | LQ accuracy | HQ accuracy | LQ TAR@FAR={float(use_far):g} "
                      f"| HQ TAR@FAR={float(use_far):g} |", "|---|---|---|---|---|---|---|"]
        for head, m in heads.items():
            lines.append(f"| {dataset} | {head} | {_pm(m['spearman'], 2)} | {_pm(m['lq_accuracy'])} | "
                         f"{_pm(m['hq_accuracy'])} | {_pm(m['lq_tar'][use_far])} | {_pm(m['hq_tar'][use_far])} |")
        lines.append(f"| {dataset} | untrained | {_pm(s['untrained_spearman'], 2)} | | | | |")
    return "\n".join(lines) + "\n"


def paired_text(summary: dict) -> str:
    """AdaFace minus each other head, per seed, on LQ and HQ accuracy."""
    lines = []
    for dataset, s in summary.items():
        for head, m in s["heads"].items():
            d = m.get("adaface_minus_this")
            if d:
                lines.append(f"{dataset}: AdaFace - {head}, per seed: LQ accuracy "
                             f"{', '.join(f'{x:+.3f}' for x in d['lq_accuracy'])}; HQ accuracy "
                             f"{', '.join(f'{x:+.3f}' for x in d['hq_accuracy'])}")
    return "\n".join(lines) + "\n"


def _binned(quality, values, edges):
    idx = np.clip(np.searchsorted(edges, quality, side="right") - 1, 0, len(edges) - 2)
    keep = [b for b in range(len(edges) - 1) if np.any(idx == b)]
    return (np.array([np.mean(quality[idx == b]) for b in keep]), np.array([np.mean(values[idx == b]) for b in keep]))


def plot_norm_vs_quality(result: dict, summary: dict, dataset: str) -> bytes:
    """Per head: held-out norms of the first seed against quality, with every seed's binned mean."""
    plt = pyplot()
    info = result["datasets"][dataset]
    quality = np.asarray(info["test_quality"])
    heads = list(summary[dataset]["heads"])
    fig, axes = plt.subplots(1, len(heads), figsize=(4.6 * len(heads), 3.8), squeeze=False)
    edges = np.quantile(quality, np.linspace(0, 1, 9))
    for ax, head in zip(axes[0], heads):
        runs = _runs(result, dataset, head)
        ax.scatter(quality, runs[0]["norms"], s=5, alpha=0.3, color=HEAD_COLOURS.get(head, "k"))
        for r in runs:
            x, y = _binned(quality, np.asarray(r["norms"]), edges)
            ax.plot(x, y, "-o", ms=3, lw=1.5, color=HEAD_COLOURS.get(head, "k"), alpha=0.8)
        sp = summary[dataset]["heads"][head]["spearman"]
        ax.set_title(f"{head}: Spearman {sp[0]:+.2f} ± {sp[1]:.2f}", fontsize=10)
        ax.set_xlabel(info["quality_name"], fontsize=8)
        ax.set_ylabel("feature norm (held-out)")
        ax.grid(True, ls=":", alpha=0.5)
    fig.suptitle(f"{dataset}: feature norm against quality (dots: seed {runs[0]['seed']}; lines: each seed's binned mean)")
    return figure_png(fig)


def plot_accuracy_by_quality(result: dict, summary: dict) -> bytes:
    """10-fold accuracy per pair-quality bin, mean ± std over seeds, one panel per dataset."""
    plt = pyplot()
    datasets = list(summary)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        edges = result["datasets"][dataset]["bin_edges"]
        labels = [f"{edges[b]:.2f}..{edges[b + 1]:.2f}" for b in range(len(edges) - 1)]
        for k, (head, m) in enumerate(summary[dataset]["heads"].items()):
            mean, std = np.array(m["accuracy_by_bin"]).T
            x = np.arange(len(mean)) + (k - 1) * 0.08
            ax.errorbar(x, mean, yerr=std, fmt="-o", ms=4, capsize=3, label=head, color=HEAD_COLOURS.get(head, "k"))
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("pair quality bin (lower image's quality)")
        ax.set_ylabel("10-fold accuracy")
        ax.set_title(dataset)
        ax.grid(True, ls=":", alpha=0.5)
        ax.legend(fontsize=8)
    fig.suptitle("Held-out verification by pair quality (mean ± std over seeds)")
    return figure_png(fig)


def _scaler_panel(ax, result: dict, dataset: str, title: str):
    """AdaFace's mean margin scaler of the low- and high-quality training probes over steps, every seed."""
    for k, r in enumerate(_runs(result, dataset, "adaface")):
        p = r["probe"]
        ax.plot(p["step"], p["scaler_lq"], color="tab:purple", alpha=0.7, label=None if k else "low-quality probes")
        ax.plot(p["step"], p["scaler_hq"], color="tab:orange", alpha=0.7, label=None if k else "high-quality probes")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")


def _finish(fig, axes, legend_size: int) -> bytes:
    for ax in np.ravel(axes):
        ax.grid(True, ls=":", alpha=0.5)
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return figure_png(fig)


def plot_adaface_training(result: dict) -> bytes:
    """AdaFace over training: the margin scaler of low- and high-quality probe images, and the EMA of the
    batch norm mean and std (the scaler's reference), every seed."""
    plt = pyplot()
    datasets = [d for d in result["datasets"] if _runs(result, d, "adaface")]
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.4 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets):
        _scaler_panel(row[0], result, dataset, f"{dataset}: mean margin scaler of training probes")
        row[0].set_ylabel("clip(h (||z|| - mean) / std, -1, 1)")
        for k, r in enumerate(_runs(result, dataset, "adaface")):
            h = r["history"]
            steps = np.arange(1, len(h["batch_mean"]) + 1)
            row[1].plot(steps, h["batch_mean"], color="tab:red", alpha=0.7, label=None if k else "batch_mean")
            row[1].plot(steps, h["batch_std"], color="tab:gray", alpha=0.7, label=None if k else "batch_std")
        row[1].set_title(f"{dataset}: AdaFace norm statistics (EMA)", fontsize=10)
        row[1].set_xlabel("step")
        row[1].set_yscale("log")
    return _finish(fig, axes, 8)


def plot_overview(result: dict, summary: dict) -> bytes:
    """The README figure: per dataset, relative norm against quality per head, accuracy by quality bin per
    head, and AdaFace's scaler for low- and high-quality probes over training."""
    plt = pyplot()
    datasets = list(summary)
    fig, axes = plt.subplots(len(datasets), 3, figsize=(15, 3.6 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets):
        info = result["datasets"][dataset]
        quality = np.asarray(info["test_quality"])
        edges = np.quantile(quality, np.linspace(0, 1, 7))
        for head, m in summary[dataset]["heads"].items():
            colour = HEAD_COLOURS.get(head, "k")
            curves = []
            for r in _runs(result, dataset, head):
                norms = np.asarray(r["norms"])
                x, y = _binned(quality, norms / norms.mean(), edges)
                curves.append(y)
            row[0].plot(x, np.mean(curves, 0), "-o", ms=3, color=colour,
                        label=f"{head} (ρ {m['spearman'][0]:+.2f} ± {m['spearman'][1]:.2f})")
            mean, std = np.array(m["accuracy_by_bin"]).T
            row[1].errorbar(np.arange(len(mean)), mean, yerr=std, fmt="-o", ms=4, capsize=3, color=colour, label=head)
        row[0].set_title(f"{dataset}: norm / mean norm (held-out)", fontsize=10)
        row[0].set_xlabel(info["quality_name"], fontsize=8)
        row[1].set_title(f"{dataset}: 10-fold accuracy by pair quality", fontsize=10)
        row[1].set_xlabel("pair quality bin (0 = lowest)")
        _scaler_panel(row[2], result, dataset, f"{dataset}: AdaFace margin scaler over training")
    return _finish(fig, axes, 7)


def write_report(result: dict, out_dir: str) -> dict:
    """table.md, the PNGs and then summary.json into ``out_dir`` (a local folder or a ``gs://`` URL), each file
    written atomically; summary.json comes last, so a report that has it is whole (an earlier report's is removed
    first). A file of one of those names that is not an earlier report's is refused. Returns {name: path}."""
    out_dir = io.check_creatable_dir(out_dir, "--out")
    summary = summarize(result)
    files = {"table": ("table.md", lambda: table_markdown(summary) + "\n" + paired_text(summary)),
             "overview": ("overview.png", lambda: plot_overview(result, summary)),
             "accuracy_by_quality": ("accuracy_by_quality.png", lambda: plot_accuracy_by_quality(result, summary))}
    if any(r["head"] == "adaface" for r in result["runs"]):
        files["adaface_training"] = ("adaface_training.png", lambda: plot_adaface_training(result))
    for dataset in summary:
        files[f"norm_vs_quality_{dataset}"] = (f"norm_vs_quality_{dataset}.png",
                                               lambda dataset=dataset: plot_norm_vs_quality(result, summary, dataset))
    io.makedirs(out_dir)
    for name in [n for n, _ in files.values()] + [SUMMARY_FILE]:
        io.check_output_file(io.join(out_dir, name), "--out", suffixes=(name[name.rindex("."):],))
    marker = io.join(out_dir, SUMMARY_FILE)
    io.remove(marker)  # an earlier report is no longer whole while this one is written
    paths = {}
    for key, (name, make) in files.items():
        content = make()
        write = io.write_text if isinstance(content, str) else io.write_bytes
        paths[key] = write(io.join(out_dir, name), content)
    paths["summary"] = io.write_json(marker, summary)  # last
    return paths
