"""Training with the dataset and the workdir in a bucket, end to end through `adaface-jax train` against a real
Cloud Storage API server on loopback (tests/support/gcs_server.py):

* a run with validation every epoch reads its TFRecords and its .bin from gs:// and writes metrics.jsonl,
  tensorboard/, training_samples.png, checkpoints/ and best/ into gs:// (and nothing local);
* SIGTERM saves the step reached into the bucket and a resume from the bucket ends bit-identical to a run that
  was never interrupted;
* two processes (gloo collectives) train into one gs:// workdir; SIGTERM to one of them stops both after the
  same step with one checkpoint of both, and ONE process resumes it from the bucket;
* `--workdir gs:/typo/run` and `--workdir s4://b/run` are refused in one line, before anything is created.

The runs are `adaface-jax` subprocesses with the server's environment, run in ``tmp_path`` (where no folder
named after a URL scheme may appear); in-process calls (uploading the data, reading results) reach the same
server through the environment the gcs_server fixture sets. The model is the tiny backbone on 16x16 inputs:
4 identities x 8 images, a global batch of 8 (4 steps per epoch)."""
import json
import os
import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from adaface_jax import io
from tests.support import REPO as REPO_ROOT
from tests.support.cli_fixtures import CLI, assert_no_scheme_folders, slowed_cli
from tests.support.gcs_server import KNOWN_REFUSED, activity_between

REPO = str(REPO_ROOT)
CONFIG = os.path.join(REPO, "configs", "cpu_synthetic.py")
CLASSES, PER_CLASS, BATCH = 4, 8, 8
SPE = CLASSES * PER_CLASS // BATCH  # steps per epoch
TIMEOUT_S = 420  # subprocesses start, compile and train on 2 shared cores


# ------------------------------------------------------------------------------------------------ helpers

def train_argv(workdir, data_dir, total_steps, **overrides):
    """`adaface-jax train` arguments for the tiny backbone on the bucket's dataset; ``overrides`` are config
    fields ('evals.verification.every_epochs' written with '__' for '.')."""
    config = {"data.data_dir": data_dir, "model.arch": "tiny", "model.embedding_size": 16,
              "num_classes": CLASSES, "global_batch_size": BATCH, "total_steps": total_steps,
              "data.image_size": 16, "checkpoint.every_steps": 2, "log_every": 1, "progress": "false",
              "sample_grid": "false", "evals.verification.every_epochs": 0, "evals.verification.batch_size": 8}
    config.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["train", "--config", CONFIG, "--workdir", workdir, *(f"--config.{k}={v}" for k, v in config.items())]


def child_env(gcs_server, tmp_path, ndev=2):
    tmp = tmp_path / "child_tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, **gcs_server.env, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={ndev}", "TF_CPP_MIN_LOG_LEVEL": "2"}


def start(gcs_server, tmp_path, argv, ndev=2, step_delay_s=0.0):
    """`adaface-jax ARGV` started in ``tmp_path`` (stdout dropped, stderr kept); ``step_delay_s``: a sleep after
    each training step (cli_fixtures.slowed_cli)."""
    return subprocess.Popen([*slowed_cli(step_delay_s), *argv], env=child_env(gcs_server, tmp_path, ndev), cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc, what):
    """Wait for a started run; assert it succeeded without a traceback; return its stderr."""
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"{what} (rc {proc.returncode}): {err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    return err


def run(gcs_server, tmp_path, argv, ndev=2):
    return finish(start(gcs_server, tmp_path, argv, ndev), " ".join(argv[:1]))


def checkpoint_steps(workdir, folder="checkpoints"):
    """Step folders in a gs:// workdir (a listing; TF caches no listing between processes)."""
    d = io.join(workdir, folder)
    return sorted(int(n) for n in io.listdir(d) if n.isdigit()) if io.isdir(d) else []


def metrics_lines(workdir):
    return [json.loads(line) for line in io.read_text(io.join(workdir, "metrics.jsonl")).splitlines()]


def final_items(workdir):
    """(last step, every array of its state) read back from the bucket."""
    from adaface_jax.train.checkpointer import restore_items  # noqa: PLC0415
    step = checkpoint_steps(workdir)[-1]
    items = jax.device_get(restore_items(io.join(workdir, "checkpoints", str(step))))
    return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(items)}


def assert_server_clean(server, before):
    """Since the ``server.log(requests=0)`` snapshot ``before``: nothing refused (a request off loopback), no GCE
    metadata probe, no handler error."""
    new = activity_between(before, server.log(requests=0))
    del new["connects"]
    new["refused"] = [r for r in new["refused"] if r["target"] not in KNOWN_REFUSED]
    assert new == {"refused": [], "metadata": [], "errors": []}, new


@pytest.fixture(autouse=True)
def _server_stays_clean(request):
    if "gcs_server" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("gcs_server")
    before = server.log(requests=0)
    yield
    assert_server_clean(server, before)


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    """The prepared dataset written locally: 4 identities x 8 images in 4 shards and a 10-pair tiny_val.bin."""
    from data_pipeline.synthetic import write_synthetic_dataset, write_verification_bin  # noqa: PLC0415
    d = tmp_path_factory.mktemp("train_gcs_data")
    write_synthetic_dataset(str(d), num_identities=CLASSES, images_per_identity=PER_CLASS, seed=1, num_shards=4,
                            show_progress=False)
    write_verification_bin(str(d / "tiny_val.bin"), num_identities=4, num_pairs=10, seed=0)
    return str(d)


@pytest.fixture(scope="module")
def bucket(gcs_server, local_data):
    """A bucket for this module holding the dataset, uploaded file by file to gs://<bucket>/data."""
    name = gcs_server.make_bucket()
    root = f"gs://{name}"
    for folder, _, files in os.walk(local_data):
        rel = os.path.relpath(folder, local_data)
        for f in files:
            io.copy(os.path.join(folder, f), io.join(root, "data", *([] if rel == "." else rel.split(os.sep)), f))
    assert io.isfile(f"{root}/data/manifest.json") and io.isfile(f"{root}/data/tiny_val.bin")
    yield root
    gcs_server.delete_bucket(name)


TOTAL = 2 * SPE  # the uninterrupted run: two epochs, validated after each


@pytest.fixture(scope="module")
def runs(gcs_server, bucket, tmp_path_factory):
    """Two runs started together, with validation every epoch, from the bucket's dataset into the bucket:
    'straight' trains TOTAL steps uninterrupted (with the sample grid); 'stopped' (which would go on for 1000
    steps, slowed down by a step delay) gets SIGTERM once its first checkpoint is listed in the bucket, and
    saves the step it reached. Returns {'data', 'straight', 'stopped', 'reached', 'cwd', 'stderr': {...}}."""
    before = gcs_server.log(requests=0)  # (a module fixture: set up before the per-test guard's snapshot)
    cwd = tmp_path_factory.mktemp("train_gcs_cwd")
    data = f"{bucket}/data"
    straight, stopped = f"{bucket}/runs/straight", f"{bucket}/runs/stopped"
    validated = {"evals__verification__every_epochs": 1}
    ref = start(gcs_server, cwd, train_argv(straight, data, TOTAL, sample_grid="true", **validated))
    proc = start(gcs_server, cwd, train_argv(stopped, data, 1000, **validated), step_delay_s=0.5)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not checkpoint_steps(stopped):
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) first: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint in the bucket in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # (polls first: never signals a reaped pid)
    except BaseException:
        for p in (proc, ref):
            p.kill()
            p.wait()
        raise
    stopped_err = finish(proc, "the signalled run")
    straight_err = finish(ref, "the uninterrupted run")
    reached = checkpoint_steps(stopped)[-1]
    assert_server_clean(gcs_server, before)
    return {"data": data, "straight": straight, "stopped": stopped, "reached": reached, "cwd": cwd,
            "stderr": {"straight": straight_err, "stopped": stopped_err}}


# -------------------------------------------------------------------------------------------------- tests

def test_train_with_validation_from_the_bucket(runs):
    workdir, err = runs["straight"], runs["stderr"]["straight"]
    assert f"finished: step {TOTAL} (done)" in err, err[-3000:]
    lines = metrics_lines(workdir)
    val = [r for r in lines if "val/mean_acc" in r]
    assert [r["step"] for r in val] == [SPE, 2 * SPE], lines
    assert all(0.0 <= r["val/tiny_val_acc"] <= 1.0 and r["val/mean_acc"] == r["val/tiny_val_acc"] for r in val)
    assert [r["step"] for r in lines if "train/loss" in r] == list(range(1, TOTAL + 1))
    assert checkpoint_steps(workdir) == [TOTAL - 2, TOTAL]  # every 2 steps, cpu_synthetic keeps 2
    assert len(checkpoint_steps(workdir, "best")) == 1
    assert io.read_bytes(f"{workdir}/training_samples.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents") for n in io.listdir(f"{workdir}/tensorboard"))
    meta = json.loads(io.read_text(f"{workdir}/checkpoints/{TOTAL}/meta/metadata"))
    assert meta["config"]["data"]["data_dir"] == runs["data"] and meta["topology"] == {"processes": 1, "devices": 2}
    assert not [n for n in io.listdir(workdir) if n.endswith(io.TEMP_SUFFIX)]
    assert_no_scheme_folders(runs["cwd"])


def test_sigterm_then_resume_from_the_bucket_is_bit_identical(gcs_server, runs):
    """The signalled run saved the step it reached into the bucket; resumed from the bucket to TOTAL steps it ends
    with the same arrays, bit for bit, as the run never interrupted. The delay only slows the run down."""
    stopped, straight, reached, err = runs["stopped"], runs["straight"], runs["reached"], runs["stderr"]["stopped"]
    assert f"signal 15: saved step {reached} and stopping" in err, err[-3000:]
    assert metrics_lines(stopped)[-1]["step"] == reached
    assert reached < TOTAL, f"the run reached step {reached} before SIGTERM: nothing left to resume"

    res_err = run(gcs_server, runs["cwd"], train_argv(stopped, runs["data"], TOTAL,
                                                      evals__verification__every_epochs=1))
    assert f"resumed from {stopped} at step {reached}" in res_err

    step_a, a = final_items(straight)
    step_b, b = final_items(stopped)
    assert step_a == step_b == TOTAL and set(a) == set(b) and int(b["['step']"]) == TOTAL
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    from adaface_jax.weights import load_weights  # noqa: PLC0415
    wa, wb = load_weights(straight), load_weights(stopped)
    assert wa.arch == wb.arch == "tiny"
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(wa.variables), jax.tree_util.tree_leaves(wb.variables)):
        np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_array_equal(wb.head["kernel"], wa.head["kernel"])
    assert_no_scheme_folders(runs["cwd"])


def copy_tree(src, dst, skip=()):
    """Every file below the gs:// folder ``src`` copied to ``dst``, but those named in ``skip``."""
    for folder, _, files in io.walk(src):
        rel = folder[len(src):].strip("/")
        for name in files:
            if name not in skip:
                io.copy(io.join(folder, name), io.join(dst, *([rel] if rel else []), name))


def test_a_step_a_killed_save_left_in_the_bucket_is_passed_over(runs):
    """On gs:// orbax writes a step in place and marks it finished with commit_success.txt files: a save killed
    before it committed leaves a step folder that is listed but unfinished. Readers of a workdir in a bucket
    (load_weights: evaluate, export, --init-from) take the last finished step, as the resume does."""
    from adaface_jax.train.checkpointer import Checkpointer, find_step_dir  # noqa: PLC0415
    from adaface_jax.run_dir import RunDir  # noqa: PLC0415
    from adaface_jax.weights import load_weights  # noqa: PLC0415
    workdir = f"{runs['data'].rsplit('/', 1)[0]}/runs/killed"
    copy_tree(f"{runs['straight']}/checkpoints/{TOTAL}", f"{workdir}/checkpoints/{TOTAL}")
    copy_tree(f"{runs['straight']}/checkpoints/{TOTAL}", f"{workdir}/checkpoints/{TOTAL + 2}",
              skip=("commit_success.txt",))
    assert checkpoint_steps(workdir) == [TOTAL, TOTAL + 2]
    assert find_step_dir(workdir) == f"{workdir}/checkpoints/{TOTAL}"
    assert find_step_dir(workdir, step=TOTAL + 2) is None
    got, want = load_weights(workdir), load_weights(runs["straight"])
    assert got.meta["training"]["step_dir"] == f"{workdir}/checkpoints/{TOTAL}"
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(want.variables),
                            jax.tree_util.tree_leaves(got.variables)):
        np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))
    ckpt = Checkpointer(RunDir.of(workdir))  # the resume's view: the same step
    try:
        assert ckpt.latest_step() == TOTAL
    finally:
        ckpt.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_stop_together_on_sigterm_to_one_and_one_process_resumes(gcs_server, bucket, tmp_path):
    """2 processes x 1 device (gloo) train into one gs:// workdir, slowed down by a step delay. Once their first
    checkpoint is in the bucket, process 1 ALONE gets SIGTERM: both processes save the same step (JAX's preemption
    service agrees on it; a process stopping alone leaves the other in a collective) and exit cleanly. Then one
    process with 2 devices resumes the run from the bucket (1 divides the 8 input streams) and goes on."""
    workdir, data = f"{bucket}/runs/pod", f"{bucket}/data"
    for attempt in range(3):  # another program may take the coordinator port between its choice and its bind
        port = _free_port()
        procs = [start(gcs_server, tmp_path, ["train", "--coordinator-address", f"localhost:{port}",
                                              "--num-processes", "2", "--process-id", str(pid),
                                              "--cpu-collectives", "gloo", *train_argv(workdir, data, 1000)[1:]],
                       ndev=1, step_delay_s=0.3) for pid in range(2)]
        deadline, signalled = time.monotonic() + TIMEOUT_S, False
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break  # a failed process leaves its peer waiting for it
            if not signalled and checkpoint_steps(workdir):
                procs[1].send_signal(signal.SIGTERM)  # (polled above: never signals a reaped pid)
                signalled = True
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()
        errs = [p.communicate()[1] for p in procs]
        taken = any(k in e.lower() for e in errs for k in ("address already in use", "failed to bind"))
        if not (taken and any(p.returncode for p in procs)):
            break
    for pid, (p, e) in enumerate(zip(procs, errs)):
        assert p.returncode == 0 and "Traceback" not in e, f"process {pid} (rc {p.returncode}): {e[-3000:]}"
    saved = [re.findall(r"signal 15: saved step (\d+) and stopping", e) for e in errs]
    assert len(saved[0]) == 1 and saved[0] == saved[1], saved
    reached = int(saved[0][0])
    assert reached > 2 and checkpoint_steps(workdir)[-1] == reached, (reached, checkpoint_steps(workdir))
    state_dir = f"{workdir}/checkpoints/{reached}/state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(io.listdir(state_dir)), io.listdir(state_dir)
    meta = json.loads(io.read_text(f"{workdir}/checkpoints/{reached}/meta/metadata"))
    assert meta["topology"] == {"processes": 2, "devices": 2}
    assert [r["step"] for r in metrics_lines(workdir)] == list(range(1, reached + 1))  # process 0 alone writes it

    total = reached + 2
    err = run(gcs_server, tmp_path, train_argv(workdir, data, total))
    assert f"resumed from {workdir} at step {reached}" in err
    assert "resuming a run of 2 process(es) / 2 device(s) on 1 / 2" in err
    step, items = final_items(workdir)
    assert step == total and int(items["['step']"]) == total
    assert all(np.isfinite(v).all() for k, v in items.items() if v.dtype.kind == "f")
    assert [r["step"] for r in metrics_lines(workdir)] == list(range(1, total + 1))
    assert_no_scheme_folders(tmp_path)


REFUSED = {"gs:/typo/run": "gs:/typo/run: not a valid URL", "s4://b/run": "s4://b/run: unsupported URL scheme 's4:'"}


def test_a_workdir_url_the_file_layer_does_not_serve_is_refused(tmp_path):
    """Each run in its own empty cwd (both at once): exit 1, the refusal naming the path, no traceback, nothing
    created (no folder named after the scheme, no data or workdir folder)."""
    env = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": "", "XLA_FLAGS": ""}
    procs = {}
    for i, workdir in enumerate(REFUSED):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        procs[workdir] = (cwd, subprocess.Popen([*CLI, *train_argv(workdir, "nodata", 2)], env=env, cwd=str(cwd),
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for workdir, (cwd, proc) in procs.items():
        _, err = proc.communicate(timeout=TIMEOUT_S)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
        assert len(lines) == 1, lines  # refused before logging, the config or the compilation cache start
        assert lines[0].startswith("adaface-jax train: error: --workdir ") and REFUSED[workdir] in lines[0], lines
        assert list(cwd.iterdir()) == []
    assert_no_scheme_folders(tmp_path)
