"""``adaface-jax quickstart``: the whole system on one CPU machine, nothing downloaded.

1. render the synthetic identity dataset (train identities) and a verification .bin of
   held-out identities with a quality label per image;
2. score the untrained network on the held-out pairs;
3. train with AdaFace on all local devices (``configs/quickstart_cpu.py`` through the same
   loop as every recipe: orbax checkpoints, TensorBoard + JSONL logs, a sample grid);
4. score the trained network: 10-fold accuracy (overall and by pair quality), TAR@FAR, an ROC
   curve and the feature-norm-vs-quality plot; print a table and write ``results.json``.

The workdir may be a local folder or a ``gs://`` URL: every file goes through ``adaface_jax.io`` (the training
run's layout is ``RunDir``'s), each output is written atomically, and ``results.json`` -- the marker of a
finished quickstart -- is removed when a run starts and written last.
"""
from __future__ import annotations

import functools
import logging
import os
import time

import jax
import numpy as np
from scipy.stats import spearmanr

from adaface_jax import io
from adaface_jax.features import extract_features
from adaface_jax.run_dir import RunDir
from adaface_jax.train.config import apply_overrides, check_config, load_config
from adaface_jax.train.loop import train
from adaface_jax.train.setup import build_backbone
from adaface_jax.train.state import init_variables
from data_pipeline import synthetic
from data_pipeline.bin_reader import load_bin
from evaluation.evaluators import VerificationEvaluator
from evaluation.ijb import roc_curve, tar_at_far
from evaluation.plots import plot_norm_vs_quality, plot_roc

log = logging.getLogger("adaface_jax.quickstart")
RESULTS = "results.json"  # the marker of a finished quickstart: written last
OUTPUTS = ("roc.png", "norm_vs_quality.png", RESULTS)  # in the workdir, besides data/ and run/
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                              "quickstart_cpu.py")  # the repository's recipe (a local Python file)


def _pair_quality(quality: np.ndarray) -> np.ndarray:
    """A pair is as good as its worse image."""
    return np.minimum(quality[0::2], quality[1::2])


def score_pairs(features, norms, issame, quality) -> dict:
    """Verification numbers on interleaved pairs (the ``VerificationEvaluator`` that ``adaface-jax
    evaluate`` uses), also split at the median pair quality, and TAR@FAR from the pair cosines."""

    issame = np.asarray(issame, bool)
    pairs = np.asarray(features).reshape(-1, 2, features.shape[1])
    pq = _pair_quality(quality)
    high = pq >= np.median(pq)
    masks = {"all": np.ones_like(high), "high_quality": high, "low_quality": ~high}
    evaluator = VerificationEvaluator({k: (None, issame[m]) for k, m in masks.items()})
    sets = evaluator.score({k: (pairs[m].reshape(-1, features.shape[1]), None) for k, m in masks.items()})["sets"]
    cos = np.sum(pairs[:, 0] * pairs[:, 1], axis=1)
    fpr, tpr, _ = roc_curve(issame, cos)
    return {"accuracy": sets["all"]["accuracy"], "best_threshold": sets["all"]["best_threshold"],
            "tar_at_far": tar_at_far(fpr, tpr, (1e-2, 1e-1)),
            **{f"accuracy_{k}": sets[k]["accuracy"] for k in ("high_quality", "low_quality")},
            "roc": (fpr, tpr), "norms": norms}


def run_quickstart(workdir: str, *, config_path: str | None = None, overrides: dict | None = None,
                   identities: int = 100, images_per_identity: int = 24, val_identities: int = 60,
                   val_pairs: int = 400, seed: int = 0) -> dict:
    """The whole quickstart (see the module docstring); returns the results written to results.json."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t_start = time.time()
    workdir = io.check_creatable_dir(workdir, "--workdir")  # refused before anything is made
    data_dir = io.join(workdir, "data")
    run = RunDir.of(io.join(workdir, "run"), "--workdir")
    config_path = config_path or DEFAULT_CONFIG

    overrides = {**(overrides or {}), "num_classes": str(identities), "data.data_dir": data_dir}
    config = check_config(apply_overrides(load_config(config_path), overrides), num_devices=jax.device_count(),
                          process_count=jax.process_count())  # refused before anything is rendered
    for name in OUTPUTS:  # an earlier quickstart's outputs are replaced, another file of that name refused
        if io.exists(io.join(workdir, name)):
            io.check_output_file(io.join(workdir, name), "--workdir", suffixes=(name[name.rindex("."):],))
    io.makedirs(workdir)
    io.remove(io.join(workdir, RESULTS))  # not a finished quickstart while this one runs

    # 1. data (skipped when already there, so a rerun resumes training instead of starting over)
    val_bin, val_quality = render_data(data_dir, identities, images_per_identity, val_identities, val_pairs, seed)
    images, issame = load_bin(val_bin)
    quality = np.load(io.readable(val_quality))

    # 2. the untrained network: the exact initial state training starts from. Jitted, as the trainer's init is
    # (train.setup.init_state): op by op, XLA rounds some initialisers one ulp differently, and takes longer.
    model = build_backbone(config, 1)
    init = functools.partial(init_variables, model, num_classes=config.num_classes,
                             image_size=config.data.image_size, embedding_size=config.model.embedding_size)
    params, batch_stats, _ = jax.jit(init)(jax.random.PRNGKey(config.seed))
    print("[2/4] scoring the untrained network on held-out identities")
    feats0, norms0 = extract_features(model, {"params": params["backbone"], "batch_stats": batch_stats}, images,
                                      batch_size=config.evals.verification.batch_size, progress=False)
    before = score_pairs(feats0, norms0, issame, quality)

    # 3. training
    print(f"[3/4] training {config.model.arch} (width {config.model.width}) with "
          f"{config.head.name} on {jax.device_count()} device(s); logs and checkpoints in {run}")
    summary, state = train(config, run.root)

    # 4. the trained network
    print("[4/4] scoring the trained network")
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
    variables = jax.tree_util.tree_map(np.asarray, variables)
    feats1, norms1 = extract_features(model, variables, images, batch_size=config.evals.verification.batch_size, progress=False)
    after = score_pairs(feats1, norms1, issame, quality)

    results = write_results(workdir, run, before, after, quality, summary, seconds=time.time() - t_start)
    print(format_table(results, len(issame)))
    return results


def render_data(data_dir: str, identities: int, images_per_identity: int, val_identities: int, val_pairs: int,
                seed: int) -> tuple[str, str]:
    """The training identities (a TFRecord dataset) and the held-out verification .bin with its per-image
    quality in ``data_dir`` (local or ``gs://``), each made only when it is not there yet; returns the paths of
    the .bin and of its ``.quality.npy``."""
    val_bin = io.join(data_dir, "synthetic_val.bin")
    val_quality = val_bin[:-len(".bin")] + ".quality.npy"  # written next to it by write_verification_bin
    if not io.exists(io.join(data_dir, "manifest.json")):
        print(f"[1/4] rendering {identities} x {images_per_identity} synthetic training faces")
        synthetic.write_synthetic_dataset(data_dir, identities, images_per_identity, seed=seed)
    if not (io.exists(val_bin) and io.exists(val_quality)):
        print(f"[1/4] rendering {val_pairs} verification pairs of {val_identities} held-out identities")
        synthetic.write_verification_bin(val_bin, val_identities, val_pairs, seed=seed)
    return val_bin, val_quality


def write_results(workdir: str, run: RunDir, before: dict, after: dict, quality, summary: dict,
                  seconds: float) -> dict:
    """The ROC and norm-vs-quality plots, then ``results.json`` (the marker, last) into ``workdir`` (local or
    ``gs://``), each written atomically; ``before``/``after`` are ``score_pairs`` of the untrained and the
    trained network, ``summary`` what ``train`` returned. Returns the results."""
    roc_png = io.write_bytes(io.join(workdir, "roc.png"),
                             plot_roc({"untrained": before["roc"], "trained": after["roc"]},
                                      title="Held-out synthetic identities", xlim=(1e-3, 1.0)))
    norm_png = io.write_bytes(io.join(workdir, "norm_vs_quality.png"),
                              plot_norm_vs_quality(after["norms"], quality, reference=(before["norms"], "untrained"),
                                                   label="trained"))
    results = {}
    for name, r in (("untrained", before), ("trained", after)):
        results[name] = {k: v for k, v in r.items() if k not in ("roc", "norms")}
        results[name]["norm_quality_spearman"] = float(spearmanr(quality, r["norms"][:, 0]).statistic)
    results["train"] = {"steps": summary["step"], "final_loss": summary["metrics"].get("loss"),
                        "batch_mean": summary["metrics"].get("batch_mean"),
                        "batch_std": summary["metrics"].get("batch_std")}
    results["files"] = {"checkpoints": run.checkpoints, "tensorboard": run.tensorboard, "metrics": run.metrics,
                        "roc": roc_png, "norm_vs_quality": norm_png, "training_samples": run.training_samples}
    results["seconds"] = round(seconds, 1)
    io.write_json(io.join(workdir, RESULTS), results, indent=2)  # last
    return results


def format_table(results: dict, num_pairs: int) -> str:
    rows = [("10-fold accuracy", "accuracy"), ("  on high-quality pairs", "accuracy_high_quality"),
            ("  on low-quality pairs", "accuracy_low_quality")]
    lines = [f"\nHeld-out synthetic identities, {num_pairs} pairs", f"{'':28s}{'untrained':>12s}{'trained':>12s}"]
    for label, key in rows:
        lines.append(f"{label:28s}{results['untrained'][key]:12.4f}{results['trained'][key]:12.4f}")
    for far in ("0.01", "0.1"):
        u = results["untrained"]["tar_at_far"][float(far)]
        t = results["trained"]["tar_at_far"][float(far)]
        lines.append(f"{'TAR @ FAR=' + far:28s}{u:12.4f}{t:12.4f}")
    lines.append(f"{'norm-quality Spearman':28s}{results['untrained']['norm_quality_spearman']:12.3f}"
                 f"{results['trained']['norm_quality_spearman']:12.3f}")
    tr = results["train"]
    lines.append(f"\ntrained {tr['steps']} steps, final loss {tr['final_loss']:.3f}, "
                 f"AdaFace batch_mean {tr['batch_mean']:.2f} batch_std {tr['batch_std']:.2f}; "
                 f"{results['seconds']:.0f} s in all")
    lines.append("files: " + ", ".join(f"{k}={v}" for k, v in results["files"].items()))
    return "\n".join(lines)
