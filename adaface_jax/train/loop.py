"""The training loop: config -> mesh -> state (fresh, resumed or fine-tuned) -> jitted step -> logs,
checkpoints and validation.

``train(config, workdir)`` is the whole run; every stage is a small function so notebooks can reuse
them.  The step is data-parallel over every device of every process, written as ``jit`` over a
device mesh with sharded arrays (see ``adaface_jax.parallel``).
"""
from __future__ import annotations

import json
import logging
import signal
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from adaface_jax import heads, io, parallel
from adaface_jax.errors import ConfigError, InputError  # noqa: F401  (ConfigError: re-exported)
from adaface_jax.features import make_embed_fn
from adaface_jax.train.checkpointer import Checkpointer
from adaface_jax.train.config import check_config, precision_of_saved_config
from adaface_jax.train.setup import build_trainer
from adaface_jax.train.state import TrainState
from adaface_jax.weights import load_weights
from data_pipeline.manifest import read_manifest
from data_pipeline.streams import TrainInputConfig, effective_streams
from data_pipeline.streams import steps_per_epoch as pipeline_spe
from adaface_jax.run_dir import RunDir
from evaluation.evaluators import EVALUATORS

log = logging.getLogger("adaface_jax.train")


class TooManySkippedSteps(RuntimeError):
    pass


class TooManyBadRecords(InputError):
    """More training records failed to decode than ``config.data.max_bad_records`` allows."""


# --------------------------------------------------------------------------------------------- config

def read_data_manifest(config) -> Optional[dict]:
    """The dataset manifest for ``data.source='tfrecord'`` (None for the random source)."""
    if config.data.source == "random":
        return None
    data_dir = config.data.data_dir
    if not data_dir:
        raise ConfigError("config.data.data_dir: empty; expected the folder of a prepared dataset")
    try:
        data_dir = io.check_path(data_dir, "config.data.data_dir")
    except InputError as e:
        raise ConfigError(str(e)) from e
    if not io.isdir(data_dir):
        raise ConfigError(f"config.data.data_dir={data_dir!r}: directory not found")
    try:
        return read_manifest(data_dir)
    except FileNotFoundError as e:
        raise ConfigError(f"config.data.data_dir={data_dir!r}: no dataset manifest ({e})") from e


def steps_per_epoch(config, manifest: Optional[dict]) -> int:
    """Full global batches per epoch (the input pipeline's count; random source: num_images // batch)."""
    if manifest is None:
        return max(1, int(config.data.num_images) // config.global_batch_size)
    try:
        return int(pipeline_spe(input_config(config), manifest))
    except ValueError as e:
        raise ConfigError(f"config.global_batch_size={config.global_batch_size}: {e}") from e


# ---------------------------------------------------------------------------------------------- model

def load_init_from(path: str) -> tuple[dict, dict, Optional[dict]]:
    """--init-from: (backbone params, batch_stats, head dict or None) as numpy, from anything
    ``adaface_jax.weights.load_weights`` reads."""
    loaded = load_weights(path)
    return loaded.variables["params"], loaded.variables["batch_stats"], loaded.head


def leaf_shapes(tree) -> dict:
    """``{'params/backbone/conv/kernel': shape}`` for every array leaf of a tree (arrays, ShapeDtypeStructs or
    orbax's array metadata). Paths are written the same for dict keys, attributes and indices, so a state and
    the metadata orbax read back for it (dicts where the state has named tuples) compare equal."""
    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    return {"/".join(name(k) for k in path): tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def first_shape_mismatch(want, got):
    """The first leaf (sorted by path) where two trees differ in presence or shape: ``(path, expected, found)``
    with shapes as text ('missing' for an absent leaf), or None when they agree."""
    w, g = leaf_shapes(want), leaf_shapes(got)
    text = lambda shape: "missing" if shape is None else f"of shape {shape}"  # noqa: E731
    for key in sorted(set(w) | set(g)):
        if w.get(key) != g.get(key):
            return key, text(w.get(key)), text(g.get(key))
    return None


def apply_init_from(state: TrainState, path: str, config, shardings, weights=None) -> TrainState:
    """Copy backbone weights (and the head when its class count matches) into a fresh state.
    ``weights``: what ``load_init_from(path)`` returned, when already read."""
    backbone, batch_stats, head = weights if weights is not None else load_init_from(path)
    params = dict(state.params)
    for what, want, got in (("params", state.params["backbone"], backbone), ("batch_stats", state.batch_stats,
                                                                              batch_stats)):
        first = first_shape_mismatch(want, got)
        if first is not None:
            key, expected, found = first
            raise ConfigError(f"--init-from {path}: {what}/{key} is {found}, config.model (arch={config.model.arch!r}, "
                              f"width={config.model.width}, embedding_size={config.model.embedding_size}) expects "
                              f"{expected}")
    params["backbone"] = backbone
    head_state = state.head_state
    if head is not None and np.shape(head.get("kernel"))[1:] == (config.num_classes,):
        k = np.asarray(head["kernel"], np.float32)
        pad = np.asarray(state.params["head"]["kernel"])[:, config.num_classes:]
        params["head"] = {"kernel": np.concatenate([k, pad], axis=1)}
        if isinstance(head_state, heads.AdaFaceState) and "batch_mean" in head:
            head_state = heads.AdaFaceState(np.asarray(head["batch_mean"], np.float32).reshape(1),
                                            np.asarray(head["batch_std"], np.float32).reshape(1))
        log.info("init-from %s: backbone and head (%d classes)", path, config.num_classes)
    else:
        log.info("init-from %s: backbone only; head reinitialised (class count differs)", path)
    new = state.replace(params=params, batch_stats=batch_stats, head_state=head_state)
    new = new.replace(opt_state=state.tx.init(new.params))
    items = jax.device_put(new.checkpoint_items(), shardings.checkpoint_items())
    return state.replace_from_checkpoint(items)


# ----------------------------------------------------------------------------------------------- data

def random_batches(config, start_step: int, local_batch: int) -> Iterator[dict]:
    """Noise images with random labels, each row a pure function of (seed, step, global row): for benchmarks
    and plumbing tests, selected with ``data.source='random'``. This process's rows are the block
    [process_index * local_batch, (process_index + 1) * local_batch) of the global batch, so the global
    batches do not depend on the number of processes."""
    size = config.data.image_size
    first = jax.process_index() * local_batch
    step = start_step
    while True:
        rows = [np.random.RandomState([config.seed, step, first + r]) for r in range(local_batch)]
        yield {"image": np.stack([rs.uniform(-1, 1, (size, size, 3)).astype(np.float32) for rs in rows]),
               "label": np.array([rs.randint(0, config.num_classes) for rs in rows], np.int32)}
        step += 1


def input_config(config):
    d = config.data
    return TrainInputConfig(data_dir=d.data_dir, global_batch_size=config.global_batch_size, seed=config.seed,
                            process_index=jax.process_index(), process_count=jax.process_count(),
                            augment=d.augment, crop_prob=d.crop_prob, lowres_prob=d.lowres_prob,
                            photometric_prob=d.photometric_prob, flip_prob=d.flip_prob, image_size=d.image_size,
                            num_streams=int(d.num_streams))


def data_layout(config) -> dict:
    """What fixes the sequence of global batches (recorded in every checkpoint): the same values on any topology
    reproduce the same batches; ``streams`` = gcd(data.num_streams, global_batch_size) for the tfrecord source."""
    streams = (effective_streams(int(config.data.num_streams), config.global_batch_size)
               if config.data.source == "tfrecord" else 0)
    return {"source": config.data.source, "global_batch_size": int(config.global_batch_size),
            "seed": int(config.seed), "streams": int(streams)}


def check_resume_layout(saved_meta: dict, config, workdir: str, step: int, num_devices: int) -> None:
    """Refuses a resume that would not continue the checkpoint's sequence of global batches (one line naming
    the field). The process and device counts may change freely."""
    saved = (saved_meta or {}).get("data_layout")
    if saved is None:
        log.warning("checkpoint %s step %d records no data layout (written before elastic input): the data order "
                    "after the resume may differ from the run that wrote it", workdir, step)
        return
    now = data_layout(config)
    fields = {"source": "config.data.source", "global_batch_size": "config.global_batch_size", "seed": "config.seed",
              "streams": "config.data.num_streams"}
    for key, field in fields.items():
        if saved.get(key) != now[key]:
            raise ConfigError(f"{field}: the checkpoint in {workdir} (step {step}) was written with {key}="
                              f"{saved.get(key)!r} and this run has {now[key]!r}; resuming would not continue its "
                              f"sequence of global batches (restore that value, or start a new workdir)")
    topo = saved_meta.get("topology") or {}
    if topo and (topo.get("processes"), topo.get("devices")) != (jax.process_count(), num_devices):
        log.info("resuming a run of %s process(es) / %s device(s) on %d / %d: the global batches continue "
                 "unchanged", topo.get("processes"), topo.get("devices"), jax.process_count(), num_devices)


# What a checkpoint's arrays depend on, by config field: a resume with another value cannot restore them.
# (Dropout, learning rate, augmentation, Partial FC's sample rate and the like may change freely.)
RESUME_MODEL_FIELDS = ("model.arch", "model.width", "model.embedding_size", "num_classes", "head.name")


def _field(config_dict, dotted: str):
    value = config_dict
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) or hasattr(value, "get") else None
    return value


def check_resume_model(saved_meta: dict, config, workdir: str, step: int) -> None:
    """Refuses, naming the config field, a resume whose model, head or precision would not fit the checkpoint's
    arrays: the fields of ``RESUME_MODEL_FIELDS`` and float16's loss-scale state (``precision``)."""
    saved = (saved_meta or {}).get("config")
    if not saved:
        return
    now = json.loads(config.to_json())
    changed = [(f, _field(saved, f), _field(now, f)) for f in RESUME_MODEL_FIELDS
               if _field(saved, f) is not None and _field(saved, f) != _field(now, f)]
    saved_precision = precision_of_saved_config(saved)
    if (saved_precision == "float16") != (config.precision == "float16"):
        changed.append(("precision", saved_precision, config.precision))
    if changed:
        field, was, is_now = changed[0]
        raise ConfigError(f"config.{field}: the checkpoint in {workdir} (step {step}) was written with {field}={was!r} "
                          f"and this run has {is_now!r}; its arrays cannot be restored into this model (restore that "
                          "value, or start a new workdir; --init-from starts a new run from its weights)")


def check_checkpoint_shapes(saved: dict, target: dict, where: str) -> None:
    """The saved arrays' tree and shapes against the state this run built (orbax's own error for a mismatch is
    a tree dump): one line naming the first differing leaf, expected and found."""
    first = first_shape_mismatch(target, saved)
    if first is not None:
        key, expected, found = first
        raise ConfigError(f"checkpoint {where}: {key} is {found}, this run's configuration expects {expected} "
                          "(a changed model, head, class count or precision; restore those values or start a new "
                          "workdir)")


def make_input(config, start_step: int) -> Iterator[dict]:
    """Host-local batches starting at global step ``start_step`` (an exact resume of the data order): this
    process's contiguous block of rows of each global batch, which is the same for any process/device count."""
    local_batch = config.global_batch_size // jax.process_count()
    if config.data.source == "random":
        return random_batches(config, start_step, local_batch)
    # TensorFlow costs seconds of start-up: imported only for a TFRecord dataset
    from data_pipeline.input import hide_gpus_from_tf, make_train_iterator  # noqa: PLC0415
    hide_gpus_from_tf()
    return make_train_iterator(input_config(config), start_step=start_step)


# ----------------------------------------------------------------------------------------- validation

def build_evaluators(config) -> dict:
    """The evaluators of a checked config that run (``every_epochs`` > 0): ``{name: (evaluator, spec)}``, built
    once before training (their data is read now, so a bad file fails before the first step)."""
    return {name: (EVALUATORS[spec.type].from_config(spec, config.data.data_dir, where=f"config.evals.{name}"), spec)
            for name, spec in config.evals.items() if spec.every_epochs > 0}


def run_evaluators(due: dict, model_eval, state: TrainState, mesh, cpu_convolutions: str) -> dict:
    """Every evaluator of ``due`` (``{name: (evaluator, spec)}``) on the state's backbone -> their flat metrics."""
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
    metrics = {}
    for evaluator, spec in due.values():
        embed_fn = make_embed_fn(model_eval, variables, batch_size=spec.batch_size, mesh=mesh,
                                 cpu_convolutions=cpu_convolutions)
        metrics.update(evaluator.scalar_metrics(evaluator.run(embed_fn)))
    return metrics


# ---------------------------------------------------------------------------------------------- logs

class MetricsLog:
    """JSONL file + TensorBoard (clu) on process 0."""

    # An object store cannot append, so in a bucket the log is kept in memory and the object rewritten whole:
    # at most this often, and at every checkpoint and at the end (``flush``). The rewrite grows with the run
    # (a few MB for a full recipe), so it is not done at every log step. A kill -9 loses at most this much of
    # metrics.jsonl; TensorBoard's events have every step.
    REMOTE_FLUSH_S = 60.0

    def __init__(self, run_dir: RunDir):
        self.enabled = jax.process_index() == 0
        self.path = run_dir.metrics
        self.writer = None
        self.remote_lines = None  # a local file is appended to
        self.pending = False
        self.last_flush = time.monotonic()
        if self.enabled and io.is_remote(self.path):
            self.remote_lines = io.read_text(self.path).splitlines(True) if io.isfile(self.path) else []
        if self.enabled:
            try:
                from clu import metric_writers  # noqa: PLC0415
                self.writer = metric_writers.create_default_writer(run_dir.tensorboard, just_logging=False,
                                                                   asynchronous=True)
            except ImportError as e:  # pragma: no cover - clu is a dependency
                log.warning("TensorBoard disabled: %s", e)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        line = json.dumps({"step": step, **scalars}) + "\n"
        if self.remote_lines is None:
            with io.open(self.path, "a") as f:
                f.write(line)
        else:
            self.remote_lines.append(line)
            self.pending = True
            if time.monotonic() - self.last_flush >= self.REMOTE_FLUSH_S:
                self.flush()
        if self.writer is not None:
            self.writer.write_scalars(step, scalars)

    def flush(self) -> None:
        """Upload the bucket's log now (nothing to do for a local file, which is appended to)."""
        if self.remote_lines is not None and self.pending:
            io.write_text(self.path, "".join(self.remote_lines))
            self.pending = False
            self.last_flush = time.monotonic()

    def close(self):
        self.flush()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class _StopRequest:
    """When to save and stop before the end: after SIGTERM or SIGINT.

    In one process the signal handlers set a flag. With several processes every one must stop after the same
    step, since a save is collective: a process that stopped alone would leave the others waiting in the next
    step's collectives. There JAX's preemption service catches SIGTERM on any process and agrees on the step
    (``multihost_utils.reached_preemption_sync_point``, which every process calls after every step); SIGINT is
    left to Python and ends that process (run the job again to resume from the last checkpoint)."""

    def __init__(self):
        self.signum = None
        self._old = {}
        self._agreed = jax.process_count() > 1

    def __enter__(self):
        if self._agreed:
            if not jax.config.jax_enable_preemption_service:
                log.warning("jax_enable_preemption_service is off: SIGTERM ends the processes without a checkpoint")
                self._agreed = False  # and no handler either: each process alone cannot stop safely
            return self
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def after(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (called after every step, on every process)."""
        if self._agreed and self.signum is None:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = signal.SIGTERM  # the one signal the preemption service listens for
        return self.signum is not None

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------- loop

def train(config, workdir: str, *, init_from: Optional[str] = None, devices=None,
          after_step: Optional[Callable[[int], None]] = None) -> tuple[dict, TrainState]:
    """Run (or resume) training; returns (summary dict: step, metrics, stop_reason, ...; final TrainState).

    Raises ConfigError before compiling on a bad configuration and TooManySkippedSteps after
    ``config.max_skipped_in_row`` consecutive non-finite steps (checked at log steps). ``after_step(step)``
    is called after each step is logged, before its evaluation, checkpoint and signal check (tests slow a
    run down with it).
    """
    run_dir = RunDir.of(workdir)
    mesh = parallel.make_mesh(devices)
    ndev = mesh.devices.size
    manifest = read_data_manifest(config)
    config = check_config(config, num_devices=ndev, process_count=jax.process_count(), manifest=manifest)
    spe = steps_per_epoch(config, manifest)
    total_steps = int(config.total_steps) if config.total_steps > 0 else int(config.epochs * spe)
    # Nothing is written into a new workdir until every check has passed (the checkpointer creates folders).
    open_checkpointer = lambda: Checkpointer(run_dir, max_to_keep=config.checkpoint.keep,  # noqa: E731
                                             async_save=config.checkpoint.async_save,
                                             best_metric=config.checkpoint.best_metric,
                                             best_mode=config.checkpoint.best_mode)
    # Every process takes process 0's answer: it looks before it creates the folder (a later look elsewhere would
    # find it and resume while process 0 starts afresh).
    ckpt = open_checkpointer() if parallel.process0_decides(io.isdir(run_dir.checkpoints)) else None
    resume_step = ckpt.latest_step() if ckpt is not None else None
    # Read the fine-tuning weights before anything is built, so a bad --init-from fails at once.
    init_weights = load_init_from(init_from) if (init_from and resume_step is None) else None
    padded = parallel.padded_num_classes(config.num_classes, ndev)
    if resume_step is not None:
        saved_meta = ckpt.read_meta(resume_step)
        check_resume_layout(saved_meta, config, run_dir.root, resume_step, ndev)
        check_resume_model(saved_meta, config, run_dir.root, resume_step)
        saved_padded = int(saved_meta.get("padded_classes", padded))
        if saved_padded % ndev:
            raise ConfigError(f"checkpoint in {run_dir.checkpoints} has {saved_padded} kernel columns, not divisible "
                              f"by {ndev} devices")
        padded = saved_padded
    trainer = build_trainer(config, mesh, steps_per_epoch=spe, padded_classes=padded)
    state, shardings, train_step = trainer.state, trainer.shardings, trainer.step
    bad_records = 0  # training records replaced because they failed to decode (data.max_bad_records)
    if resume_step is not None:
        check_checkpoint_shapes(ckpt.item_metadata(resume_step), state.checkpoint_items(),
                                f"{run_dir.checkpoints} (step {resume_step})")
        state, meta = ckpt.restore(state, mesh, resume_step)
        bad_records = int((meta or {}).get("bad_records", 0))
        log.info("resumed from %s at step %d", run_dir, int(state.step))
    elif init_from:
        state = apply_init_from(state, init_from, config, shardings, weights=init_weights)

    meta = {"arch": config.model.arch, "head": config.head.name, "num_classes": config.num_classes,
            "padded_classes": padded, "steps_per_epoch": spe, "config": json.loads(config.to_json()),
            "data_layout": data_layout(config), "topology": {"processes": jax.process_count(), "devices": ndev}}
    evaluators = build_evaluators(config)  # reads their data: a bad file fails before anything is written
    run_dir.create()
    ckpt = ckpt or open_checkpointer()
    metrics_log = MetricsLog(run_dir)
    model_eval = trainer.eval_model  # eval: running statistics, no groups

    start = int(jax.device_get(state.step))
    if start == 0 and config.sample_grid and config.data.source == "tfrecord" and jax.process_index() == 0:
        from data_pipeline.input import save_augmentation_grid  # noqa: PLC0415  (TensorFlow, as in make_input)
        save_augmentation_grid(config.data.data_dir, run_dir.training_samples)
    batches = make_input(config, start)
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0 or not config.progress)
    summary = {"stop_reason": "done"}
    last = {}
    t0, imgs_since = time.time(), 0
    step = start
    bad_here = 0  # this process's bad records since the processes last added theirs up into bad_records

    def count_bad_records(by_step: int) -> None:
        """Add every process's new bad records to ``bad_records`` and stop past data.max_bad_records. Each process
        decodes its own rows, so the count is summed over processes (an all-gather: every process calls this at
        the same steps), and they all stop together."""
        nonlocal bad_records, bad_here
        bad_records += parallel.sum_over_processes(bad_here)
        bad_here = 0
        if bad_records > config.data.max_bad_records:
            ckpt.wait()
            bar.close()
            metrics_log.close()
            ckpt.close()
            raise TooManyBadRecords(
                f"{bad_records} records of {config.data.data_dir} failed to decode by step {by_step}, more "
                f"than config.data.max_bad_records={config.data.max_bad_records}; run "
                f"`adaface-jax check {config.data.data_dir}` to list them. The last checkpoint in "
                f"{run_dir.checkpoints} is intact.")

    def logs_at(s: int) -> bool:
        return s % config.log_every == 0 or s % spe == 0 or s == total_steps

    def saves_at(s: int) -> bool:
        return s % config.checkpoint.every_steps == 0 or s % spe == 0 or s == total_steps

    where = f" on process {jax.process_index()}" if jax.process_count() > 1 else ""
    with _StopRequest() as stop:
        while step < total_steps:
            batch = next(batches)
            if (bad := int(batch.pop("bad_records", 0))):
                bad_here += bad
                log.warning("step %d: %d record(s) of %s failed to decode%s and were replaced by other images of "
                            "the batch (`adaface-jax check` names them)", step + 1, bad, config.data.data_dir, where)
            # Counted before every step in one process; with several, before the steps that log or save it (not
            # every step: an all-gather waits for the step before it, which would stall the device queue).
            if jax.process_count() == 1 or logs_at(step + 1) or saves_at(step + 1):
                count_bad_records(step + 1)
            state, metrics = train_step(state, parallel.host_to_global(batch, mesh))
            step += 1
            imgs_since += config.global_batch_size
            epoch_end = step % spe == 0
            if logs_at(step):
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = max(time.time() - t0, 1e-9)
                last["images_per_sec"] = imgs_since / dt
                t0, imgs_since = time.time(), 0
                metrics_log.write(step, {**{f"train/{k}": v for k, v in last.items()}, "train/bad_records": bad_records})
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last.get('lr', 0):.2g}",
                                img_s=f"{last['images_per_sec']:.1f}")
                if last["skipped_in_row"] >= config.max_skipped_in_row:
                    ckpt.wait()
                    summary["stop_reason"] = "non_finite"
                    bar.close()
                    metrics_log.close()
                    ckpt.close()
                    raise TooManySkippedSteps(
                        f"{int(last['skipped_in_row'])} consecutive steps had a non-finite loss or gradient "
                        f"(step {step}); stopping. The last good checkpoint is intact in {run_dir.checkpoints} "
                        f"(latest step {ckpt.latest_step()}).")
            bar.update(1)
            if after_step is not None:
                after_step(step)
            epoch = (step - 1) // spe
            due = {name: (ev, spec) for name, (ev, spec) in evaluators.items()
                   if epoch_end and (epoch + 1) % spec.every_epochs == 0}
            if due:
                val = run_evaluators(due, model_eval, state, mesh, config.cpu_convolutions)
                metrics_log.write(step, val)
                last.update(val)
                log.info("step %d epoch %d: %s", step, epoch, val)
                if config.checkpoint.best_metric in val:
                    ckpt.save_best(state, {**meta, "epoch": epoch, "bad_records": bad_records}, val)
            if saves_at(step):
                ckpt.save(state, {**meta, "epoch": epoch, "bad_records": bad_records})
                metrics_log.flush()
            if stop.after(step):
                count_bad_records(step)
                ckpt.save(state, {**meta, "epoch": epoch, "bad_records": bad_records}, force=True)
                summary["stop_reason"] = f"signal {stop.signum}"
                log.warning("signal %d: saved step %d and stopping", stop.signum, step)
                break
    ckpt.wait()
    ckpt.close()
    bar.close()
    metrics_log.close()
    summary.update(step=step, metrics=last, total_steps=total_steps, steps_per_epoch=spe, bad_records=bad_records)
    return summary, state
