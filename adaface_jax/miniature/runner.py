"""Train AdaFace, ArcFace and CosFace on the same batches from the same initialisation, seed by seed, and
measure each on held-out identities (``evaluation.quality``).

One step is compiled per (dataset, head) with ``train.setup.build_trainer``; every seed re-initialises the
state and reuses it.  A run's record is written to ``<out>/runs/<dataset>-<head>-seed<k>.json`` as soon as
it finishes, and a re-run with the same settings skips the runs already recorded (resume after an
interrupt).  ``<out>`` may be a local folder or a ``gs://`` URL: every file goes through ``adaface_jax.io``,
each written atomically; ``study.json`` is written after every record (and an earlier one, with the report's
``summary.json``, removed when a run starts), so a folder that has it is a finished study.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import time

import jax
import numpy as np

from adaface_jax import io, parallel
from adaface_jax.compile_options import compiler_options
from adaface_jax.errors import ConfigError
from adaface_jax.features import normalize_bgr
from adaface_jax.heads import margin_scaler
from adaface_jax.miniature.data import StudyData, load_study_data, make_batch, probe_rows
from adaface_jax.miniature.report import SUMMARY_FILE
from adaface_jax.train.loop import make_embed_fn
from adaface_jax.train.setup import build_trainer, init_state, resolve_cpu_convolutions
from evaluation.quality import make_quality_pairs, norm_quality_spearman, verification_by_quality

STUDY_FILE = "study.json"  # the study's marker: written after every record


class Log:
    """Progress lines on stdout and appended to ``<out>/study.log``. An object in a bucket cannot be appended
    to: there the log is kept in memory (earlier runs' lines first) and the whole file uploaded anew each line."""

    def __init__(self, out_dir: str, quiet: bool = False):
        self.path = io.join(out_dir, "study.log")
        self.quiet = quiet
        self.remote = io.is_remote(self.path)
        self.text = ""
        if self.remote and io.isfile(self.path):
            self.text = io.read_text(self.path)

    def __call__(self, message: str):
        line = f"{time.strftime('%H:%M:%S')} {message}\n"
        if not self.quiet:
            print(line, end="", flush=True)
        if self.remote:
            self.text += line
            io.write_text(self.path, self.text)
        else:
            with io.open(self.path, "a", encoding="utf-8") as f:
                f.write(line)


def check_study(config) -> None:
    """Refuse, in one line naming the field, study settings that would fail or mislead after the data load."""
    s = config.study
    known = ("adaface", "arcface", "cosface")

    def need(ok, field, expected):
        if not ok:
            raise ConfigError(f"config.study.{field}={s[field]!r}: expected {expected}")

    need(len(s.heads) > 0 and len(set(s.heads)) == len(s.heads) and set(s.heads) <= set(known), "heads",
         f"distinct names from {known}")
    need(len(s.seeds) > 0 and len(set(s.seeds)) == len(s.seeds) and all(int(x) >= 0 for x in s.seeds), "seeds",
         "distinct non-negative integers")
    for field in ("steps", "probe_every", "eval_batch_size", "num_bins"):
        need(int(s[field]) >= 1, field, "a positive integer")
    need(int(s.probe_images) >= 3, "probe_images", "at least 3 (low, middle and high quality)")
    need(int(s.pairs_per_bin) >= 20 and int(s.pairs_per_bin) % 2 == 0, "pairs_per_bin", "an even number >= 20")
    need(all(0.0 < float(f) <= 1.0 for f in s.lr_milestones), "lr_milestones", "fractions of the steps in (0, 1]")
    need(all(0.0 < float(f) < 1.0 for f in s.far_targets) and len(s.far_targets) > 0, "far_targets",
         "false accept rates in (0, 1)")
    need(0.0 <= float(s.flip_prob) <= 1.0, "flip_prob", "a probability in [0, 1]")
    if "synthetic_train_severity" in s:
        need(s.synthetic_train_severity in ("drawn", "spread"), "synthetic_train_severity", "'drawn' or 'spread'")
    for field in ("arcface_m", "cosface_m"):
        need(float(s[field]) >= 0.0, field, "a margin >= 0")
    for field in ("synthetic_train_identities", "synthetic_test_identities", "synthetic_images_per_identity",
                  "synthetic_test_images_per_identity"):
        need(int(s[field]) >= 2, field, "at least 2")
    if int(config.global_batch_size) < 2:
        raise ConfigError(f"config.global_batch_size={config.global_batch_size}: expected at least 2 (AdaFace's "
                          "batch statistics)")
    resolve_cpu_convolutions(config)  # before the data is loaded, not at the first compile


def run_config(config, data: StudyData, head: str, seed: int):
    """The training config of one run: the study config with this dataset's classes, head and seed."""
    c = copy.deepcopy(config)
    c.num_classes = data.num_classes
    c.seed = int(seed)
    c.head.name = head
    if head == "arcface":
        c.head.m = float(config.study.arcface_m)
    elif head == "cosface":
        c.head.m = float(config.study.cosface_m)
    steps = int(config.study.steps)
    c.lr_milestones = tuple(int(round(f * steps)) for f in config.study.lr_milestones)  # in steps (1 step/"epoch")
    return c


def data_digest(data: StudyData) -> str:
    """Hash of a dataset's images, labels and qualities (computed once per dataset)."""
    h = hashlib.sha256()
    for a in (data.train_images, data.train_labels, data.train_quality, data.test_images, data.test_labels,
              data.test_quality):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def fingerprint(config, data_hash: str) -> str:
    """Hash of everything a run's result depends on (its settings and the data), for resuming. The study's
    lists of seeds, heads and datasets are left out: adding a seed does not change the runs already made."""
    settings = config.to_dict()
    settings["study"] = {k: v for k, v in settings["study"].items() if k not in ("seeds", "heads", "datasets")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(data_hash.encode())
    return h.hexdigest()[:16]


def _probe_fn(model, cpu_convolutions: str):
    """Training-mode norms (batch statistics, dropout on) of a probe batch, as the head sees them."""

    @functools.partial(jax.jit, compiler_options=compiler_options(cpu_convolutions))
    def probe(params, batch_stats, images, rng):
        (_, norm), _ = model.apply({"params": params["backbone"], "batch_stats": batch_stats}, images, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": rng})
        return norm[:, 0]

    return probe


def evaluate_heldout(trainer, state, data: StudyData, pairs, config) -> dict:
    """Norm-quality Spearman and quality-binned verification on the held-out identities (flip test)."""
    embed = make_embed_fn(trainer.eval_model, state, trainer.mesh, int(config.study.eval_batch_size),
                          cpu_convolutions=resolve_cpu_convolutions(config))
    feats, norms = embed(data.test_images)
    return {"spearman": norm_quality_spearman(norms[:, 0], data.test_quality),
            "bins": verification_by_quality(feats, pairs, tuple(config.study.far_targets)),
            "norms": norms[:, 0].astype(float).tolist()}


def train_one(trainer, state, probe, data: StudyData, config, seed: int, log, label: str) -> tuple:
    """Run the study's steps from ``state``; returns (state, record of the training)."""
    study = config.study
    steps, batch_size = int(study.steps), int(config.global_batch_size)
    rows = probe_rows(data.train_quality, int(study.probe_images))
    probe_images = normalize_bgr(data.train_images[rows])
    probe_quality = data.train_quality[rows]
    low = probe_quality <= np.quantile(probe_quality, 1 / 3)
    high = probe_quality >= np.quantile(probe_quality, 2 / 3)
    history = {k: [] for k in ("loss", "mean_norm", "batch_mean", "batch_std")}
    probes = {k: [] for k in ("step", "spearman", "norm_lq", "norm_hq", "scaler_lq", "scaler_hq")}
    digest = hashlib.sha256()
    is_adaface = config.head.name == "adaface"
    t0 = time.perf_counter()

    def record_probe(step):
        norms = np.asarray(probe(state.params, state.batch_stats, probe_images, jax.random.PRNGKey(10_000 + step)))
        probes["step"].append(step)
        probes["spearman"].append(norm_quality_spearman(norms, probe_quality))
        probes["norm_lq"].append(float(norms[low].mean()))
        probes["norm_hq"].append(float(norms[high].mean()))
        if is_adaface:
            mu, sigma = (float(np.asarray(x).reshape(-1)[0]) for x in (state.head_state.batch_mean,
                                                                       state.head_state.batch_std))
            scaler = np.asarray(margin_scaler(norms, mu, sigma, float(config.head.h)))
            probes["scaler_lq"].append(float(scaler[low].mean()))
            probes["scaler_hq"].append(float(scaler[high].mean()))

    for step in range(steps):
        if step % int(study.probe_every) == 0:
            record_probe(step)
        batch = make_batch(data, seed, step, batch_size, float(study.flip_prob))
        digest.update(batch["rows"].astype(np.int64).tobytes())
        digest.update(batch["flips"].tobytes())
        state, metrics = trainer.step(state, parallel.host_to_global(
            {"image": batch["image"], "label": batch["label"]}, trainer.mesh))
        metrics = jax.device_get(metrics)
        for k in history:
            if k in metrics:
                history[k].append(float(metrics[k]))
        if not np.isfinite(metrics["loss"]):
            log(f"{label}: non-finite loss at step {step + 1}")
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            dt = time.perf_counter() - t0
            log(f"{label}: step {step + 1}/{steps} loss {metrics['loss']:.3f} "
                f"{(step + 1) * batch_size / dt:.0f} img/s, ETA {dt / (step + 1) * (steps - step - 1):.0f} s")
    record_probe(steps)
    history = {k: v for k, v in history.items() if v}
    return state, {"history": history, "probe": {k: v for k, v in probes.items() if v},
                   "batch_digest": digest.hexdigest(), "train_s": time.perf_counter() - t0}


def run_study(config, out_dir: str, yale_b_dir: str | None = None, quiet: bool = False) -> dict:
    """Every (dataset, head, seed) run of ``config.study``; returns {'datasets': {...}, 'runs': [...]}
    and writes ``<out>/runs/*.json`` and then ``<out>/study.json`` (``out_dir``: a local folder or a ``gs://``
    URL; refused, before anything is made, when it is neither or names a file)."""
    study = config.study
    out_dir = io.check_creatable_dir(out_dir, "--out")
    if yale_b_dir is not None:
        yale_b_dir = io.check_path(yale_b_dir, "--yale-b")
    check_study(config)
    markers = [io.join(out_dir, name) for name in (STUDY_FILE, SUMMARY_FILE)]
    for marker in markers:  # an earlier study's are replaced; another file of that name is refused
        if io.exists(marker):
            io.check_output_file(marker, "--out", suffixes=(".json",))
    io.makedirs(io.join(out_dir, "runs"))
    for marker in markers:  # no longer a finished study while it is updated
        io.remove(marker)
    log = Log(out_dir, quiet)
    t_start = time.perf_counter()
    datasets = load_study_data(config, yale_b_dir)
    mesh = parallel.make_mesh(jax.local_devices()[:1])  # one device: XLA's threads use every core
    result = {"datasets": {}, "runs": []}
    total = len(datasets) * len(study.heads) * len(study.seeds)
    done = resumed = 0
    for data in datasets:
        data_hash = data_digest(data)
        pairs = make_quality_pairs(data.test_labels, data.test_quality, int(study.num_bins),
                                   int(study.pairs_per_bin), int(study.pair_seed))
        result["datasets"][data.name] = {
            "quality_name": data.quality_name, "train_images": int(data.train_images.shape[0]),
            "train_identities": data.num_classes, "test_images": int(data.test_images.shape[0]),
            "test_identities": int(np.unique(data.test_labels).size), "bin_edges": pairs.edges.tolist(),
            "test_quality": data.test_quality.astype(float).tolist(), "untrained": {}}
        log(f"{data.name}: {data.train_images.shape[0]} training images of {data.num_classes} identities, "
            f"{data.test_images.shape[0]} held-out images of {result['datasets'][data.name]['test_identities']}")
        for head in study.heads:
            trainer = None
            for seed in study.seeds:
                done += 1
                label = f"[{done}/{total}] {data.name} {head} seed {seed}"
                cfg = run_config(config, data, head, seed)
                path = io.join(out_dir, "runs", f"{data.name}-{head}-seed{seed}.json")
                key = fingerprint(cfg, data_hash)
                if io.exists(path):
                    try:
                        previous = json.loads(io.read_text(path))
                    except (OSError, ValueError) as e:  # a damaged record is trained again, not trusted
                        log(f"{label}: {path} is unreadable ({type(e).__name__}), training it again")
                        previous = {}
                    if isinstance(previous, dict) and previous.get("fingerprint") == key:
                        log(f"{label}: recorded earlier, skipped")
                        resumed += 1
                        result["runs"].append(previous)
                        _untrained(result, data.name, seed, previous)
                        continue
                if trainer is None:
                    t = time.perf_counter()
                    trainer = build_trainer(cfg, mesh, steps_per_epoch=1)
                    probe = _probe_fn(trainer.model, resolve_cpu_convolutions(config))
                    state = trainer.state
                    log(f"{data.name} {head}: trainer built in {time.perf_counter() - t:.1f} s")
                else:  # a fresh state for this seed; the optimizer object is the compiled step's (same schedule)
                    state, _ = init_state(cfg, trainer.model, trainer.mesh, trainer.schedule, trainer.padded_classes)
                    state = state.replace(tx=trainer.state.tx)
                untrained = evaluate_heldout(trainer, state, data, pairs, cfg)
                state, record = train_one(trainer, state, probe, data, cfg, seed, log, label)
                record.update(dataset=data.name, head=head, seed=int(seed), fingerprint=key,
                              untrained_spearman=untrained["spearman"], **evaluate_heldout(trainer, state, data,
                                                                                          pairs, cfg))
                record = json.loads(json.dumps(record))  # as a resumed run reads it back (e.g. FAR keys as text)
                io.write_json(path, record)
                result["runs"].append(record)
                _untrained(result, data.name, seed, record)
                lq, hq = record["bins"][0]["accuracy"], record["bins"][-1]["accuracy"]
                log(f"{label}: held-out Spearman(norm, quality) {record['spearman']:+.3f} "
                    f"(untrained {untrained['spearman']:+.3f}), accuracy LQ {lq:.3f} HQ {hq:.3f}, "
                    f"{record['train_s']:.0f} s")
    result["runtime_s"] = time.perf_counter() - t_start  # this invocation (recorded runs are not re-run)
    result["resumed_runs"] = resumed
    result["config"] = config.to_dict()
    io.write_json(io.join(out_dir, STUDY_FILE), result, default=str)
    log(f"study finished in {result['runtime_s'] / 60:.1f} min")
    return result


def _untrained(result, dataset: str, seed: int, record: dict):
    result["datasets"][dataset]["untrained"][str(seed)] = record["untrained_spearman"]
