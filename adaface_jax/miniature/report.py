"""The study's runs -> a summary with the endpoints' statistics and a verdict for each claim, the text that says
them (the mechanism gate first), a Markdown table and PNG plots.

Decision rules, fixed with the endpoints in ``configs/paper_miniature.py`` before a run:

* **Gate.** AdaFace's mean margin scaler of the highest quality third of the probe batch minus that of the
  lowest, averaged over seeds, at the gate step and at the end. It passes when both are at least
  ``study.gate_min_gap`` (0.4: a spread beyond +-0.2). If it fails, the text says so first and claim 2 is
  "not testable here": only the oracle arm is read.
* **Hard samples.** At the gate step, the accuracy (nearest class centre) on the probe batch's degraded rows
  over that on its clean rows, pooled over arms and seeds, is at most ``study.hard_max_ratio``. If not,
  claim 2 is "not testable here".
* **A comparison is "shown"** when the one-sided paired t-test over seeds gives p < ``study.alpha`` and the
  bootstrap's one-sided lower bound (seeds and test identities resampled) is above 0; otherwise "not shown",
  with the minimum detectable effect of the design.
"""
from __future__ import annotations

import numpy as np

from adaface_jax import io
from adaface_jax.miniature import stats
from evaluation.plots import figure_png, pyplot

SUMMARY_FILE = "summary.json"  # the report's marker: written last, removed before anything of a new report
ARM_COLOURS = {"adaface": "tab:red", "cosface": "tab:green", "arcface": "tab:blue", "oracle": "tab:purple"}
MARGIN_HEAD_ARMS = ("adaface", "cosface", "arcface")  # the arms claim 1 is about
METRIC_NAMES = {"rank1_degraded": "rank-1 of degraded probes", "rank1_clean": "rank-1 of clean probes",
                "tar_degraded": "TAR of degraded probes", "tar_clean": "TAR of clean probes"}
SHOWN, NOT_SHOWN, NOT_TESTABLE = "shown", "not shown", "not testable here"


def _mean_sd(values) -> list:
    v = np.asarray(values, np.float64)
    return [float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0]


def _runs(result, arm: str) -> list:
    return sorted((r for r in result["runs"] if r["arm"] == arm), key=lambda r: r["seed"])


def _arms(result) -> list:
    present = {r["arm"] for r in result["runs"]}
    return [a for a in ARM_COLOURS if a in present]


def _probe_at(run, step: int) -> dict:
    return next(p for p in run["probes"] if p["step"] == step)


def _per_identity(run, result, group: str) -> np.ndarray:
    """Rank-1 accuracy of each held-out identity's probes of ``group`` in one run."""
    labels = np.asarray(result["data"][f"{group}_probe_labels"])
    correct = np.asarray(run["correct"][group], np.float64)
    ids = np.unique(labels)
    return np.array([correct[labels == i].mean() for i in ids])


def _endpoint(result, text: str, study: dict) -> dict:
    metric, a, b = text.replace("-", " ").split()
    out = {"endpoint": text, "metric": metric, "arms": [a, b]}
    runs_a, runs_b = _runs(result, a), _runs(result, b)
    if not runs_a or not runs_b:
        return {**out, "missing": [x for x, r in ((a, runs_a), (b, runs_b)) if not r]}
    by_seed = lambda runs: {r["seed"]: r[metric] for r in runs}
    per_identity = {}
    if metric.startswith("rank1_"):
        group = metric[len("rank1_"):]
        per_identity = {"per_identity_a": {r["seed"]: _per_identity(r, result, group) for r in runs_a},
                        "per_identity_b": {r["seed"]: _per_identity(r, result, group) for r in runs_b}}
    return {**out, **stats.compare(by_seed(runs_a), by_seed(runs_b), alpha=float(study["alpha"]),
                                   power=float(study["power"]), resamples=int(study["bootstrap"]), **per_identity)}


def _decide(cmp: dict, alpha: float) -> str:
    if "t_test" not in cmp:
        return NOT_TESTABLE
    return SHOWN if cmp["t_test"]["p"] < alpha and cmp["bootstrap"]["lower_bound"] > 0 else NOT_SHOWN


def summarize(result: dict) -> dict:
    """Per arm: the endpoints' metrics and the mechanism at the gate step and the end, [mean, sd over seeds];
    the fairness checks; the gate and the hard-sample check; every endpoint's comparison; claim 1 per margin
    head; the verdicts; and ``text``, the findings in words with the gate first."""
    study = result["config"]["study"]
    alpha = float(study["alpha"])
    out = {"arms": {}, "endpoints": {}, "claim1": {}}
    for arm in _arms(result):
        runs = _runs(result, arm)
        gate_step, last = runs[0]["gate_step"], runs[0]["probes"][-1]["step"]
        m = {"seeds": [r["seed"] for r in runs], "final_loss": _mean_sd([np.mean(r["history"]["loss"][-10:])
                                                                          for r in runs]),
             "train_s": float(sum(r["train_s"] for r in runs))}
        for metric in METRIC_NAMES:
            m[metric] = _mean_sd([r[metric] for r in runs])
        for when, step in (("gate", gate_step), ("final", last)):
            probes = [_probe_at(r, step) for r in runs]
            m[when] = {"step": step, **{k: _mean_sd([p[k] for p in probes]) for k in
                                        ("spearman", "acc_degraded", "acc_clean", "norm_degraded", "norm_clean")},
                       "grad_share": [_mean_sd([p["grad_share"][k] for p in probes]) for k in range(3)]}
            if "scaler" in probes[0]:
                m[when]["scaler"] = [_mean_sd([p["scaler"][k] for p in probes]) for k in range(3)]
                m[when]["scaler_gap"] = _mean_sd([p["scaler"][2] - p["scaler"][0] for p in probes])
        m["claim1"] = {mode: {k: _mean_sd([r["claim1"][mode][k] for r in runs]) for k in ("norm", "p_true")}
                       for mode in ("train", "eval")}
        out["arms"][arm] = m

    by_seed = {}
    for r in result["runs"]:
        by_seed.setdefault(r["seed"], []).append(r)
    out["checks"] = {
        "identical_batches": all(len({r["batch_digest"] for r in rs}) == 1 for rs in by_seed.values()),
        "identical_init": all(len({r["init_digest"] for r in rs}) == 1 for rs in by_seed.values()),
        "seeds_differ": len({rs[0]["batch_digest"] for rs in by_seed.values()}) == len(by_seed)}

    min_gap = float(study["gate_min_gap"])
    ada = out["arms"].get("adaface")
    if ada is None:
        out["gate"] = {"passed": False, "min_gap": min_gap, "reason": "no AdaFace runs"}
    else:
        gaps = [ada[w]["scaler_gap"][0] for w in ("gate", "final")]
        out["gate"] = {"passed": bool(min(gaps) >= min_gap), "gap_at_gate": gaps[0], "gap_final": gaps[1],
                       "min_gap": min_gap, "gate_step": ada["gate"]["step"],
                       "scaler_at_gate": [ada["gate"]["scaler"][k][0] for k in (0, 2)],
                       "scaler_final": [ada["final"]["scaler"][k][0] for k in (0, 2)]}
    acc = [(_probe_at(r, r["gate_step"])["acc_degraded"], _probe_at(r, r["gate_step"])["acc_clean"])
           for r in result["runs"]]
    acc_lq, acc_hq = (float(np.mean(x)) for x in zip(*acc))
    ratio = acc_lq / acc_hq if acc_hq > 0 else float("inf")
    out["hard"] = {"passed": bool(ratio <= float(study["hard_max_ratio"])), "acc_degraded": acc_lq,
                   "acc_clean": acc_hq, "ratio": ratio, "max_ratio": float(study["hard_max_ratio"])}

    out["endpoints"]["primary"] = _endpoint(result, study["primary"], study)
    out["endpoints"]["control"] = _endpoint(result, study["control"], study)
    out["endpoints"]["secondary"] = [_endpoint(result, t, study) for t in study["secondary"]]
    for arm in [a for a in MARGIN_HEAD_ARMS if a in out["arms"]]:
        runs = _runs(result, arm)
        out["claim1"][arm] = {mode: stats.compare({r["seed"]: r["claim1"][mode]["norm"] for r in runs},
                                                  {r["seed"]: r["claim1"][mode]["p_true"] for r in runs},
                                                  alpha=alpha, power=float(study["power"]),
                                                  resamples=int(study["bootstrap"]))
                              for mode in ("train", "eval")}
    out["verdicts"] = _verdicts(out, alpha)
    out["text"] = findings_text(out)
    return out


def _verdicts(s: dict, alpha: float) -> list:
    v = []
    control, primary = s["endpoints"]["control"], s["endpoints"]["primary"]
    control_verdict = _decide(control, alpha)
    v.append({"claim": "the adaptive margin helps at this scale (positive control: " + control["endpoint"] + ")",
              "verdict": control_verdict,
              "reason": _comparison_reason(control) if control_verdict != NOT_TESTABLE else _missing(control)})
    if "reason" in s["gate"]:
        verdict, reason = NOT_TESTABLE, s["gate"]["reason"]
    elif not s["gate"]["passed"]:
        verdict, reason = NOT_TESTABLE, ("the mechanism gate failed: AdaFace's scaler did not spread by "
                                         f"{s['gate']['min_gap']:.1f} between the lowest and highest quality thirds, "
                                         "so its margin never adapted; read the oracle arm only")
    elif not s["hard"]["passed"]:
        verdict, reason = NOT_TESTABLE, (f"the degraded training samples were not hard: accuracy on them was "
                                         f"{s['hard']['ratio']:.2f} of that on clean samples at the gate step "
                                         f"(at most {s['hard']['max_ratio']:.2f} was required)")
    else:
        verdict = _decide(primary, alpha)
        reason = _comparison_reason(primary) if verdict != NOT_TESTABLE else _missing(primary)
        if verdict == NOT_SHOWN and control_verdict != SHOWN:
            reason += "; the positive control did not show an effect either, so this null says little about the norm"
    v.append({"claim": "claim 2: the quality-adaptive margin helps on low-quality probes (primary: "
                       + primary["endpoint"] + ")", "verdict": verdict, "reason": reason})
    for arm, modes in s["claim1"].items():
        train = modes["train"]
        verdict = NOT_TESTABLE if "t_test" not in train else (
            SHOWN if train["t_test"]["p"] < alpha and train["mean"] > 0 else NOT_SHOWN)
        reason = ("fewer than 2 seeds" if verdict == NOT_TESTABLE else
                  f"train-mode Spearman with quality: norm minus p_y {train['mean']:+.3f} over {len(train['seeds'])} "
                  f"seeds, one-sided paired t-test p = {train['t_test']['p']:.3g}; eval mode (flip-fused) "
                  f"{modes['eval']['mean']:+.3f}")
        v.append({"claim": f"claim 1 under {arm}: the feature norm tracks quality better than p_y",
                  "verdict": verdict, "reason": reason})
    return v


def _missing(cmp: dict) -> str:
    if cmp.get("missing"):
        return f"no runs of {', '.join(cmp['missing'])}"
    return f"{len(cmp.get('seeds', []))} paired seed(s); at least 2 are needed"


def _comparison_reason(cmp: dict) -> str:
    b = cmp["bootstrap"]
    return (f"{cmp['arms'][0]} minus {cmp['arms'][1]} {cmp['mean']:+.4f} (95% CI {b['low']:+.4f} to {b['high']:+.4f}) "
            f"over {len(cmp['seeds'])} seeds; paired t-test p = {cmp['t_test']['p']:.3g}, exact Wilcoxon "
            f"p = {cmp['wilcoxon']['p']:.3g}; "
            + (f"the design detects {cmp['mde']:.4f} with {cmp['power']:.0%} power" if np.isfinite(cmp["mde"])
               else "every seed gave the same difference"))


def findings_text(s: dict) -> str:
    """The findings in words: the gate first (and, when it failed, that only the oracle arm is read), then the
    hard-sample check, the verdicts and the secondary endpoints."""
    g, lines = s["gate"], []
    if "gap_at_gate" not in g:
        lines.append(f"**Mechanism gate: failed** ({g['reason']}). Claim 2 is not testable here; only the oracle arm "
                     "is read.")
    else:
        spread = (f"AdaFace's mean margin scaler, lowest / highest quality third of the probe batch: "
                  f"{g['scaler_at_gate'][0]:+.2f} / {g['scaler_at_gate'][1]:+.2f} at step {g['gate_step']}, "
                  f"{g['scaler_final'][0]:+.2f} / {g['scaler_final'][1]:+.2f} at the end (gap {g['gap_at_gate']:.2f} "
                  f"and {g['gap_final']:.2f}; at least {g['min_gap']:.1f} needed)")
        if g["passed"]:
            lines.append(f"**Mechanism gate: passed.** {spread}.")
        else:
            how = ("its scaler was inverted: the lowest quality third had the larger norms and so the larger scaler"
                   if min(g["gap_at_gate"], g["gap_final"]) < 0 else "its margin did not adapt to quality")
            lines.append(f"**Mechanism gate: failed.** {spread}. AdaFace's margin did not follow quality ({how}): "
                         "claim 2 is not testable here and only the oracle arm is read.")
    h = s["hard"]
    lines.append(f"**Hard samples: {'yes' if h['passed'] else 'no'}.** At the gate step the degraded training "
                 f"samples were recognised {h['acc_degraded']:.2f} of the time against {h['acc_clean']:.2f} for clean "
                 f"ones (ratio {h['ratio']:.2f}; at most {h['max_ratio']:.2f} required).")
    for v in s["verdicts"]:
        lines.append(f"**{v['claim'][0].upper() + v['claim'][1:]}: {v['verdict']}.** {v['reason']}.")
    for cmp in s["endpoints"]["secondary"]:
        if "t_test" in cmp:
            lines.append(f"Secondary, {cmp['endpoint']}: {_comparison_reason(cmp)}.")
        else:
            lines.append(f"Secondary, {cmp['endpoint']}: {_missing(cmp)}.")
    return "\n\n".join(lines) + "\n"


def _pm(ms, digits=3) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def table_markdown(summary: dict, far: float) -> str:
    """Per arm: the endpoints and the mechanism at the gate step and the end (mean ± sd over seeds); then every
    comparison with its interval, tests and minimum detectable effect."""
    lines = [f"| arm | seeds | rank-1 degraded | rank-1 clean | TAR@FAR={far:g} degraded | TAR clean | "
             "Spearman(norm, q), gate / end | scaler lowest / highest third, end | gradient share of the lowest "
             "third, gate / end | accuracy degraded / clean, gate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, m in summary["arms"].items():
        g, f = m["gate"], m["final"]
        scaler = (f"{f['scaler'][0][0]:+.2f} / {f['scaler'][2][0]:+.2f}" if "scaler" in f else "")
        lines.append(f"| {arm} | {len(m['seeds'])} | {_pm(m['rank1_degraded'])} | {_pm(m['rank1_clean'])} | "
                     f"{_pm(m['tar_degraded'])} | {_pm(m['tar_clean'])} | {g['spearman'][0]:+.2f} / "
                     f"{f['spearman'][0]:+.2f} | {scaler} | {g['grad_share'][0][0]:.2f} / {f['grad_share'][0][0]:.2f} "
                     f"| {g['acc_degraded'][0]:.2f} / {g['acc_clean'][0]:.2f} |")
    lines += ["", "| comparison | mean difference | 95% CI (seeds x identities) | paired t p | exact Wilcoxon p | "
              "detectable effect (power as configured) | per seed |", "|---|---|---|---|---|---|---|"]
    e = summary["endpoints"]
    roles = [("primary", e["primary"]), ("control", e["control"])] + [("secondary", c) for c in e["secondary"]]
    for role, cmp in roles:
        if "t_test" not in cmp:
            lines.append(f"| {role}: {cmp['endpoint']} | {_missing(cmp)} | | | | | |")
            continue
        b = cmp["bootstrap"]
        mde = f"{cmp['mde']:.4f}" if np.isfinite(cmp["mde"]) else "no spread over seeds"
        lines.append(f"| {role}: {cmp['endpoint']} | {cmp['mean']:+.4f} | {b['low']:+.4f} to {b['high']:+.4f} | "
                     f"{cmp['t_test']['p']:.3g} | {cmp['wilcoxon']['p']:.3g} | {mde} | "
                     f"{', '.join(f'{x:+.3f}' for x in cmp['differences'])} |")
    lines += ["", "| claim 1 | Spearman(norm, q) train | Spearman(p_y, q) train | Spearman(norm, q) eval | "
              "Spearman(p_y, q) eval |", "|---|---|---|---|---|"]
    for arm in summary["claim1"]:
        c = summary["arms"][arm]["claim1"]
        lines.append(f"| {arm} | {_pm(c['train']['norm'], 2)} | {_pm(c['train']['p_true'], 2)} | "
                     f"{_pm(c['eval']['norm'], 2)} | {_pm(c['eval']['p_true'], 2)} |")
    return "\n".join(lines) + "\n"


def plot_overview(result: dict, summary: dict) -> bytes:
    """The study in four panels: the primary endpoint per seed and arm (AdaFace-CosFace pairs joined), the margin
    scaler of the lowest and highest quality thirds over training (AdaFace and the oracle), the share of the
    gradient scale the lowest third gets, and claim 1 (Spearman with quality of the norm and of p_y)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    arms = list(summary["arms"])
    ax = axes[0]
    for k, arm in enumerate(arms):
        runs = _runs(result, arm)
        y = [r["rank1_degraded"] for r in runs]
        ax.scatter(np.full(len(y), k), y, color=ARM_COLOURS[arm], s=18)
        ax.plot([k - 0.25, k + 0.25], [np.mean(y)] * 2, color=ARM_COLOURS[arm], lw=2)
    if "adaface" in arms and "cosface" in arms:
        cos = {r["seed"]: r["rank1_degraded"] for r in _runs(result, "cosface")}
        for r in _runs(result, "adaface"):
            if r["seed"] in cos:
                ax.plot([arms.index("adaface"), arms.index("cosface")], [r["rank1_degraded"], cos[r["seed"]]],
                        color="grey", lw=0.6, alpha=0.6)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_title("primary: rank-1 of degraded held-out probes", fontsize=10)
    ax = axes[1]
    for arm, style in (("adaface", "-"), ("oracle", "--")):
        for k, r in enumerate(_runs(result, arm)):
            steps = [p["step"] for p in r["probes"]]
            for third, colour in ((0, "tab:purple"), (2, "tab:orange")):
                ax.plot(steps, [p["scaler"][third] for p in r["probes"]], style, color=colour, alpha=0.6, lw=1,
                        label=(f"{arm}, {'lowest' if third == 0 else 'highest'} third" if k == 0 else None))
    ax.axhspan(-0.2, 0.2, color="grey", alpha=0.15)
    if result["runs"]:
        ax.axvline(result["runs"][0]["gate_step"], color="k", lw=0.6, ls=":")
    ax.set_title("margin scaler by quality third (band: +-0.2; dotted: gate step)", fontsize=10)
    ax.set_xlabel("step")
    ax = axes[2]
    for arm in arms:
        runs = _runs(result, arm)
        steps = [p["step"] for p in runs[0]["probes"]]
        share = np.mean([[p["grad_share"][0] for p in r["probes"]] for r in runs], axis=0)
        ax.plot(steps, share, color=ARM_COLOURS[arm], label=arm)
    ax.set_title("share of the gradient scale to the lowest quality third", fontsize=10)
    ax.set_xlabel("step")
    ax = axes[3]
    claim_arms = list(summary["claim1"])
    for k, arm in enumerate(claim_arms):
        c = summary["arms"][arm]["claim1"]
        for j, (mode, key, hatch) in enumerate((("train", "norm", ""), ("train", "p_true", "//"),
                                                 ("eval", "norm", ".."), ("eval", "p_true", "xx"))):
            ax.bar(k + (j - 1.5) * 0.2, c[mode][key][0], 0.18, yerr=c[mode][key][1], color=ARM_COLOURS[arm],
                   hatch=hatch, edgecolor="k", lw=0.4, label=f"{mode}: {'norm' if key == 'norm' else 'p_y'}"
                   if k == 0 else None)
    ax.set_xticks(range(len(claim_arms)), claim_arms)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("claim 1: Spearman with quality, unseen images", fontsize=10)
    for ax in axes:
        ax.grid(True, ls=":", alpha=0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def plot_training(result: dict, summary: dict) -> bytes:
    """Per arm over training: the loss, the accuracy of the probe batch's degraded and clean rows, their mean
    norms, and AdaFace's norm statistics (EMA)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.0))
    for arm in summary["arms"]:
        colour = ARM_COLOURS[arm]
        for k, r in enumerate(_runs(result, arm)):
            first = k == 0
            axes[0].plot(np.arange(1, len(r["history"]["loss"]) + 1), r["history"]["loss"], color=colour, alpha=0.5,
                         lw=0.8, label=arm if first else None)
            steps = [p["step"] for p in r["probes"]]
            axes[1].plot(steps, [p["acc_degraded"] for p in r["probes"]], "--", color=colour, alpha=0.6, lw=0.8,
                         label=f"{arm} degraded" if first else None)
            axes[1].plot(steps, [p["acc_clean"] for p in r["probes"]], "-", color=colour, alpha=0.6, lw=0.8,
                         label=f"{arm} clean" if first else None)
            axes[2].plot(steps, [p["norm_degraded"] for p in r["probes"]], "--", color=colour, alpha=0.6, lw=0.8,
                         label=f"{arm} degraded" if first else None)
            axes[2].plot(steps, [p["norm_clean"] for p in r["probes"]], "-", color=colour, alpha=0.6, lw=0.8,
                         label=f"{arm} clean" if first else None)
            if "batch_mean" in r["history"]:
                n = np.arange(1, len(r["history"]["batch_mean"]) + 1)
                axes[3].plot(n, r["history"]["batch_mean"], color=colour, alpha=0.6, lw=0.8,
                             label=f"{arm} mean" if first else None)
                axes[3].plot(n, r["history"]["batch_std"], ":", color=colour, alpha=0.6, lw=0.8,
                             label=f"{arm} std" if first else None)
    titles = ("training loss", "probe accuracy (nearest class centre)", "probe mean norm (train mode)",
              "AdaFace norm statistics (EMA)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, ls=":", alpha=0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return figure_png(fig)


def write_report(result: dict, out_dir: str, summary: dict | None = None) -> dict:
    """findings.md, table.md, the PNGs and then summary.json (``summary``, default ``summarize(result)``) into
    ``out_dir`` (a local folder or a ``gs://`` URL), each file written atomically; summary.json comes last, so a
    report that has it is whole (an earlier report's is removed first). A file of one of those names that is not
    an earlier report's is refused. Returns {name: path}."""
    out_dir = io.check_creatable_dir(out_dir, "--out")
    summary = summary if summary is not None else summarize(result)
    far = float(result["config"]["study"]["far"])
    files = {"findings": ("findings.md", lambda: summary["text"]),
             "table": ("table.md", lambda: table_markdown(summary, far)),
             "overview": ("overview.png", lambda: plot_overview(result, summary)),
             "training": ("training.png", lambda: plot_training(result, summary))}
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
