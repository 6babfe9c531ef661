"""2 processes x 4 CPU devices (gloo collectives, localhost) == 1 process x 8 devices."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from train_fixtures import run_sharded

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 240  # generous: two JAX processes start, compile and talk over gloo on 2 shared cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_equal_one_process_of_eight(tmp_path):
    out = str(tmp_path / "two_proc.npz")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "parallel_worker.py"), str(pid), "2", str(port), "4",
                               out], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    items, metrics = run_sharded(jax.devices(), num_classes=20, steps=2)  # this process: 8 devices
    want = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(items)}
    with np.load(out) as got:
        assert set(got.files) == set(want) | {"loss"}
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=1e-5, err_msg=k)
        np.testing.assert_allclose(got["loss"], metrics["loss"], rtol=1e-5)
    assert want["['params']['head']['kernel']"].shape == (16, 24)
