"""One process of the multi-process test: ``python parallel_worker.py PID NPROC PORT LOCAL_DEVICES OUT``.

Checks parallel.process0_decides, runs tests/support/train_fixtures.run_sharded over every device of every process
(gloo collectives on CPU) and, on process 0, writes the resulting state to OUT (.npz).
"""
import os
import sys

pid, nproc, port, ndev, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# A script, not a test module: the repository root makes `tests.support` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from adaface_jax import parallel  # noqa: E402

if nproc > 1:
    parallel.initialize_distributed(f"localhost:{port}", nproc, pid, cpu_collectives="gloo")
assert jax.device_count() == nproc * ndev, jax.devices()
from tests.support.train_fixtures import run_sharded  # noqa: E402

# Every process takes process 0's answer, whatever its own.
assert parallel.process0_decides(pid == 0) is True and parallel.process0_decides(pid != 0) is False

items, metrics = run_sharded(jax.devices(), num_classes=20, steps=2)
if pid == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(items)}
    flat["loss"] = np.asarray(metrics["loss"])
    np.savez(out + ".tmp.npz", **flat)
    os.replace(out + ".tmp.npz", out)
print(f"process {pid} done", flush=True)
