"""Train every arm of the study (AdaFace, CosFace, ArcFace and the oracle AdaFace) on the same batches from
the same initialisation, seed by seed, and measure each run.

An arm is a head plus where its margin scaler looks: ``oracle`` is AdaFace whose scaler takes the true quality
of each training image (``heads.adaface_logits(quality=...)``), a positive control for the adaptive margin
itself. One step is compiled per arm with ``train.setup.build_trainer``; every seed re-initialises the state
and reuses it. Seeds run in order and every arm of a seed before the next, so an interrupted study still holds
complete pairs.

During training a fixed probe batch (training images, degraded like a batch) is measured in train mode every
``probe_every`` steps and at ``gate_fraction`` of the run: Spearman(norm, quality), the margin scaler, the
gradient scale by quality third (``mechanism``) and the accuracy on its degraded and clean rows. After
training the held-out identities are scored (``evaluation.quality``) and claim 1 is measured on unseen images
of the training identities.

A run's record is written to ``<out>/runs/<arm>-seed<k>.json`` as soon as it finishes; a re-run with the same
settings skips the runs already recorded. ``<out>`` may be a local folder or a ``gs://`` URL: every file goes
through ``adaface_jax.io``, each written atomically; ``study.json`` is written after every record (and an
earlier one, with the report's ``summary.json``, removed when a run starts), so a folder that has it is a
finished study.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import time

import jax
import numpy as np

from adaface_jax import heads, io, parallel
from adaface_jax.compile_options import compiler_options
from adaface_jax.errors import ConfigError
from adaface_jax.features import make_embed_fn
from adaface_jax.miniature import mechanism
from adaface_jax.miniature.data import CLEAN, DEGRADED, StudyData, build_study_data, make_batch, probe_batch
from adaface_jax.miniature.report import SUMMARY_FILE
from adaface_jax.train.config import check_config
from adaface_jax.train.setup import build_trainer, init_state
from data_pipeline.pixels import normalize_pixels
from evaluation.quality import one_threshold_tar, quality_spearman, rank1_correct

STUDY_FILE = "study.json"  # the study's marker: written after every record
ARMS = ("adaface", "cosface", "arcface", "oracle")
ARM_HEAD = {"adaface": "adaface", "cosface": "cosface", "arcface": "arcface", "oracle": "adaface"}
METRICS = ("rank1_degraded", "rank1_clean", "tar_degraded", "tar_clean")  # what an endpoint may compare


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


def parse_endpoint(text: str, field: str) -> tuple[str, str, str]:
    """'METRIC ARM - ARM' -> (metric, arm, arm), or ConfigError naming ``config.study.<field>``."""
    parts = text.replace("-", " ").split()
    if len(parts) != 3 or parts[0] not in METRICS or not set(parts[1:]) <= set(ARMS) or parts[1] == parts[2]:
        raise ConfigError(f"config.study.{field}={text!r}: expected 'METRIC ARM - ARM' with METRIC one of {METRICS} "
                          f"and two different arms of {ARMS}")
    return parts[0], parts[1], parts[2]


def check_study(config):
    """The checked config (``train.config.check_config``, fields filled), or ConfigError naming the first bad
    study field: everything that would fail or mislead is refused before the data is made."""
    if "study" not in config:
        raise ConfigError("config has no 'study' section; expected configs/paper_miniature.py or a copy")
    s = config.study

    def need(ok, field, expected):
        if not ok:
            raise ConfigError(f"config.study.{field}={s[field]!r}: expected {expected}")

    need(len(s.arms) > 0 and len(set(s.arms)) == len(s.arms) and set(s.arms) <= set(ARMS), "arms",
         f"distinct names from {ARMS}")
    for arm in s.arms:
        seeds = s.seeds[arm] if arm in s.seeds else ()
        if not (len(seeds) > 0 and len(set(seeds)) == len(seeds) and all(int(x) >= 0 for x in seeds)):
            raise ConfigError(f"config.study.seeds.{arm}={tuple(seeds)!r}: expected distinct non-negative integers "
                              "(every arm in config.study.arms needs seeds)")
    for field in ("primary", "control"):
        parse_endpoint(s[field], field)
    for k, text in enumerate(s.secondary):
        parse_endpoint(text, f"secondary[{k}]")
    for field in ("steps", "probe_every", "eval_batch_size", "bootstrap", "train_identities", "test_identities",
                  "test_degraded_probes_per_identity", "test_clean_probes_per_identity", "claim1_images_per_identity"):
        need(int(s[field]) >= 1, field, "a positive integer")
    need(int(s.train_images_per_identity) >= 2, "train_images_per_identity", "at least 2")
    need(int(s.probe_images) >= 6, "probe_images", "at least 6 (two per quality third)")
    need(0.0 < float(s.gate_fraction) < 1.0, "gate_fraction", "a fraction of the steps in (0, 1)")
    need(all(0.0 < float(f) <= 1.0 for f in s.lr_milestones), "lr_milestones", "fractions of the steps in (0, 1]")
    need(0.0 < float(s.far) < 1.0, "far", "a false accept rate in (0, 1)")
    need(0.0 < float(s.alpha) < 0.5 and 0.5 < float(s.power) < 1.0, "alpha", "alpha in (0, 0.5), power in (0.5, 1)")
    need(0.0 <= float(s.flip_prob) <= 1.0, "flip_prob", "a probability in [0, 1]")
    need(0.0 < float(s.degraded_share) < 1.0, "degraded_share", "a share of the batch in (0, 1)")
    need(s.adaface_norm_stats in ("constants", "first_batch"), "adaface_norm_stats", "'constants' or 'first_batch'")
    size = int(config.data.image_size)
    for name in ("train_degraded", "test_degraded", "claim1_degraded"):
        d = s[name]
        if not (len(d.side) == 2 and 1 <= int(d.side[0]) <= int(d.side[1]) <= size and len(d.noise) == 2
                and 0.0 <= float(d.noise[0]) <= float(d.noise[1]) and 0.0 <= float(d.occluder_prob) <= 1.0):
            raise ConfigError(f"config.study.{name}={d.to_dict()!r}: expected side (lo, hi) in 1..{size} px, noise "
                              "(lo, hi) >= 0 and occluder_prob in [0, 1]")
    for field in ("arcface_m", "cosface_m"):
        need(float(s[field]) >= 0.0, field, "a margin >= 0")
    batch = int(config.global_batch_size)
    if batch < 6 or int(round(float(s.degraded_share) * batch)) < 2:
        raise ConfigError(f"config.global_batch_size={batch}: expected at least 6, with 2 degraded rows or more "
                          "(AdaFace's batch statistics and the quality thirds)")
    if int(s.train_identities) * int(s.train_images_per_identity) < batch:
        raise ConfigError(f"config.study: {int(s.train_identities) * int(s.train_images_per_identity)} training "
                          f"images cannot fill one batch of {batch}")
    checked = check_config(config, num_devices=1, process_count=1)
    with checked.unlocked():
        checked.num_classes = int(s.train_identities)
    return checked


def run_config(config, arm: str, seed: int):
    """The training config of one run: the study config with this arm's head, margin and seed."""
    c = copy.deepcopy(config)
    c.seed = int(seed)
    c.head.name = ARM_HEAD[arm]
    if arm == "arcface":
        c.head.m = float(config.study.arcface_m)
    elif arm == "cosface":
        c.head.m = float(config.study.cosface_m)
    steps = int(config.study.steps)
    c.lr_milestones = tuple(int(round(f * steps)) for f in config.study.lr_milestones)  # in steps (1 step/"epoch")
    return c


def data_digest(data: StudyData) -> str:
    """Hash of every image, label and quality of the study's data."""
    h = hashlib.sha256()
    for a in data.arrays():
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def fingerprint(config, arm: str, data_hash: str) -> str:
    """Hash of everything a run's result depends on (its settings, its arm and the data), for resuming. The
    lists of arms and seeds and the analysis settings are left out: adding a seed does not change a run."""
    settings = config.to_dict()
    analysis = ("arms", "seeds", "primary", "secondary", "control", "alpha", "power", "bootstrap", "gate_min_gap",
                "hard_max_ratio")
    settings["study"] = {k: v for k, v in settings["study"].items() if k not in analysis}
    settings["arm"] = arm
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(data_hash.encode())
    return h.hexdigest()[:16]


def _forward_fn(model, cpu_convolutions: str):
    """Train-mode (batch statistics, dropout on) norms and cosines to every class, as the head sees them."""

    @functools.partial(jax.jit, compiler_options=compiler_options(cpu_convolutions))
    def forward(params, batch_stats, images, rng):
        (emb, norm), _ = model.apply({"params": params["backbone"], "batch_stats": batch_stats}, images, train=True,
                                     mutable=["batch_stats"], rngs={"dropout": rng})
        return norm[:, 0], heads.cosine_logits(emb, params["head"]["kernel"], 0.0)

    return forward


def _scaler(arm: str, config, norms, quality, head_state) -> np.ndarray | None:
    """The margin scaler the arm's head would apply to this batch now (None for the fixed-margin heads)."""
    h = float(config.head.h)
    if arm == "oracle":
        return mechanism.standardised_scaler(quality, h)
    if arm != "adaface":
        return None
    clipped = np.clip(norms, 0.001, 100.0)
    mean, std = (float(np.asarray(x).reshape(-1)[0]) for x in (head_state.batch_mean, head_state.batch_std))
    if np.isnan(mean):  # statistics not seeded yet: the first batch's own
        return mechanism.standardised_scaler(clipped, h)
    return mechanism.scaler_from(clipped, mean, std, h)


def measure_probe(arm: str, config, norms, cos, batch: dict, head_state) -> dict:
    """The mechanism on one probe batch: Spearman(norm, quality); per quality third the mean scaler and the
    share of the gradient scale; accuracy (nearest class centre) and mean norm of degraded and clean rows."""
    labels, q, degraded = batch["label"], batch["quality"], batch["degraded"]
    cos = np.asarray(cos, np.float64)[:, :int(config.num_classes)]
    head = ARM_HEAD[arm]
    scaler = _scaler(arm, config, norms, q, head_state)
    m, s = float(config.head.m), float(config.head.s)
    thirds = mechanism.quality_thirds(q)
    grad = mechanism.gradient_scale(cos, labels, head, scaler, m, s)
    correct = np.argmax(cos, axis=1) == labels
    out = {"spearman": quality_spearman(norms, q), "grad_share": mechanism.third_shares(grad, thirds),
           "acc_degraded": float(correct[degraded].mean()), "acc_clean": float(correct[~degraded].mean()),
           "norm_degraded": float(np.mean(norms[degraded])), "norm_clean": float(np.mean(norms[~degraded]))}
    if scaler is not None:
        out["scaler"] = [float(scaler[thirds == k].mean()) for k in range(3)]
    return out


def _train_mode_forward(forward, state, images, batch_size: int, key: int):
    """Train-mode norms and cosines of ``images`` in batches of the training size (the last one padded)."""
    n = len(images)
    norms, cos = [], []
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        nrm, c = forward(state.params, state.batch_stats, images[rows], jax.random.PRNGKey(key + start))
        take = min(batch_size, n - start)
        norms.append(np.asarray(nrm)[:take])
        cos.append(np.asarray(c)[:take])
    return np.concatenate(norms), np.concatenate(cos)


def evaluate(trainer, state, forward, data: StudyData, config) -> dict:
    """Held-out identities: rank-1 of degraded and clean probes against the clean gallery, TAR of each at one
    threshold (FAR ``study.far`` over all impostor pairs); claim 1 on the unseen images of training identities:
    Spearman of the norm and of p_y (no margin) with quality, in train mode and in eval mode (flip-fused)."""
    study = config.study
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
    embed = make_embed_fn(trainer.eval_model, variables, batch_size=int(study.eval_batch_size), mesh=trainer.mesh,
                          cpu_convolutions=config.cpu_convolutions)
    gallery, _ = embed(data.gallery_images)
    probes, _ = embed(data.probe_images)
    correct = rank1_correct(probes, data.probe_labels, gallery, data.gallery_labels)
    tar = one_threshold_tar(probes, data.probe_labels, data.probe_groups, gallery, data.gallery_labels,
                            float(study.far))
    out = {"correct": {g: correct[data.probe_groups == g].astype(int).tolist() for g in (DEGRADED, CLEAN)},
           "rank1_degraded": float(correct[data.probe_groups == DEGRADED].mean()),
           "rank1_clean": float(correct[data.probe_groups == CLEAN].mean()),
           "tar_degraded": tar["tar"][DEGRADED], "tar_clean": tar["tar"][CLEAN], "threshold": tar["threshold"],
           "far": tar["far"]}

    n = int(config.num_classes)
    s = float(config.head.s)
    kernel = np.asarray(state.params["head"]["kernel"], np.float64)[:, :n]
    kernel /= np.linalg.norm(kernel, axis=0, keepdims=True)
    feats, norms = embed(data.claim1_images)
    eval_cos = feats / np.linalg.norm(feats, axis=1, keepdims=True) @ kernel
    train_norms, train_cos = _train_mode_forward(forward, state, normalize_pixels(data.claim1_images),
                                                 int(config.global_batch_size), 20_000)
    q, labels = data.claim1_quality, data.claim1_labels
    out["claim1"] = {}
    for mode, nrm, cos in (("train", train_norms, train_cos[:, :n]), ("eval", norms[:, 0], eval_cos)):
        p_y = mechanism.true_class_probability(cos, labels, None, None, 0.0, s)
        out["claim1"][mode] = {"norm": quality_spearman(nrm, q), "p_true": quality_spearman(p_y, q)}
    out["claim1_norms_eval"] = norms[:, 0].astype(float).tolist()
    return out


def train_one(trainer, state, forward, data: StudyData, config, arm: str, seed: int, log, label: str) -> tuple:
    """Run the study's steps from ``state``; returns (state, record of the training)."""
    study = config.study
    steps, batch_size = int(study.steps), int(config.global_batch_size)
    probe = probe_batch(data, study, seed)
    gate_step = int(round(float(study.gate_fraction) * steps))
    probe_steps = sorted(set(range(0, steps + 1, int(study.probe_every))) | {gate_step, steps})
    history = {k: [] for k in ("loss", "mean_norm", "batch_mean", "batch_std")}
    probes = []
    digest = hashlib.sha256()
    oracle = arm == "oracle"
    t0 = time.perf_counter()

    def record_probe(step):
        norms, cos = forward(state.params, state.batch_stats, probe["image"], jax.random.PRNGKey(10_000 + step))
        probes.append({"step": step, **measure_probe(arm, config, np.asarray(norms, np.float64), cos, probe,
                                                     state.head_state)})

    for step in range(steps):
        if step in probe_steps:
            record_probe(step)
        batch = make_batch(data, study, seed, step, batch_size)
        for key in ("rows", "flips", "degraded"):
            digest.update(np.ascontiguousarray(batch[key]).tobytes())
        digest.update(batch["quality"].tobytes())
        feed = {"image": batch["image"], "label": batch["label"]}
        if oracle:
            feed["quality"] = batch["quality"]
        state, metrics = trainer.step(state, parallel.host_to_global(feed, trainer.mesh))
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
    return state, {"history": {k: v for k, v in history.items() if v}, "probes": probes, "gate_step": gate_step,
                   "batch_digest": digest.hexdigest(), "train_s": time.perf_counter() - t0}


def _init_digest(state) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(state.params)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()[:16]


def _fresh_state(trainer, cfg, arm: str, first: bool):
    """The arm's initial state for ``cfg.seed`` (AdaFace's norm statistics per ``study.adaface_norm_stats``)."""
    if first:
        state = trainer.state
    else:  # the optimizer object is the compiled step's (same schedule)
        state, _ = init_state(cfg, trainer.model, trainer.mesh, trainer.schedule, trainer.padded_classes)
        state = state.replace(tx=trainer.state.tx)
    if ARM_HEAD[arm] == "adaface":
        seeded = heads.initial_state("adaface", cfg.study.adaface_norm_stats == "first_batch")
        state = state.replace(head_state=jax.device_put(seeded, trainer.shardings.head_state))
    return state


def run_study(config, out_dir: str, quiet: bool = False) -> dict:
    """Every (arm, seed) run of ``config.study``; returns {'data': {...}, 'runs': [...]} and writes
    ``<out>/runs/*.json`` and then ``<out>/study.json`` (``out_dir``: a local folder or a ``gs://`` URL;
    refused, before anything is made, when it is neither or names a file)."""
    out_dir = io.check_creatable_dir(out_dir, "--out")
    config = check_study(config)
    study = config.study
    markers = [io.join(out_dir, name) for name in (STUDY_FILE, SUMMARY_FILE)]
    for marker in markers:  # an earlier study's are replaced; another file of that name is refused
        if io.exists(marker):
            io.check_output_file(marker, "--out", suffixes=(".json",))
    io.makedirs(io.join(out_dir, "runs"))
    for marker in markers:  # no longer a finished study while it is updated
        io.remove(marker)
    log = Log(out_dir, quiet)
    t_start = time.perf_counter()
    data = build_study_data(study, int(config.data.image_size))
    data_hash = data_digest(data)
    n_degraded = int((data.probe_groups == DEGRADED).sum())
    log(f"data: {data.train_images.shape[0]} training images of {data.num_classes} identities; held out: "
        f"{len(data.gallery_labels)} identities, {n_degraded} degraded and {len(data.probe_labels) - n_degraded} "
        f"clean probes; claim 1: {len(data.claim1_labels)} unseen images of training identities "
        f"({time.perf_counter() - t_start:.0f} s)")
    mesh = parallel.make_mesh(jax.local_devices()[:1])  # one device: XLA's threads use every core
    result = {"data": {"train_images": int(data.train_images.shape[0]), "train_identities": data.num_classes,
                       "test_identities": int(len(data.gallery_labels)), "degraded_probes": n_degraded,
                       "clean_probes": int(len(data.probe_labels) - n_degraded),
                       "degraded_probe_labels": data.probe_labels[data.probe_groups == DEGRADED].tolist(),
                       "degraded_probe_quality": data.probe_quality[data.probe_groups == DEGRADED].tolist(),
                       "clean_probe_labels": data.probe_labels[data.probe_groups == CLEAN].tolist(),
                       "claim1_quality": data.claim1_quality.astype(float).tolist(), "digest": data_hash},
              "runs": []}
    seeds = sorted({int(x) for arm in study.arms for x in study.seeds[arm]})
    plan = [(seed, arm) for seed in seeds for arm in study.arms if seed in {int(x) for x in study.seeds[arm]}]
    trainers, resumed = {}, 0
    for done, (seed, arm) in enumerate(plan, 1):
        label = f"[{done}/{len(plan)}] {arm} seed {seed}"
        cfg = run_config(config, arm, seed)
        path = io.join(out_dir, "runs", f"{arm}-seed{seed}.json")
        key = fingerprint(cfg, arm, data_hash)
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
                continue
        first = arm not in trainers
        if first:
            t = time.perf_counter()
            trainer = build_trainer(cfg, mesh, steps_per_epoch=1)
            trainers[arm] = (trainer, _forward_fn(trainer.model, config.cpu_convolutions))
            log(f"{arm}: trainer built in {time.perf_counter() - t:.1f} s")
        trainer, forward = trainers[arm]
        state = _fresh_state(trainer, cfg, arm, first)
        init_digest = _init_digest(state)
        state, record = train_one(trainer, state, forward, data, cfg, arm, seed, log, label)
        t = time.perf_counter()
        record.update(arm=arm, head=ARM_HEAD[arm], seed=int(seed), fingerprint=key, init_digest=init_digest,
                      **evaluate(trainer, state, forward, data, cfg))
        record["eval_s"] = time.perf_counter() - t
        record = json.loads(json.dumps(record))  # as a resumed run reads it back
        io.write_json(path, record)
        result["runs"].append(record)
        gate = record["probes"][-1]
        scaler = f", scaler thirds {gate['scaler'][0]:+.2f}/{gate['scaler'][2]:+.2f}" if "scaler" in gate else ""
        log(f"{label}: rank-1 degraded {record['rank1_degraded']:.3f} clean {record['rank1_clean']:.3f}, "
            f"train-mode Spearman(norm, quality) {gate['spearman']:+.2f}{scaler}, {record['train_s']:.0f} s")
    result["runtime_s"] = time.perf_counter() - t_start  # this invocation (recorded runs are not re-run)
    result["resumed_runs"] = resumed
    result["config"] = config.to_dict()
    io.write_json(io.join(out_dir, STUDY_FILE), result, default=str)
    log(f"study finished in {result['runtime_s'] / 60:.1f} min")
    return result
