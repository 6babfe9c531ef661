"""Devices and layouts: one 1-D mesh ('data') over every device of every process.

* The global batch is sharded along 'data' (``batch_sharding``); each process feeds only its own
  rows (``host_to_global``), as pmap-era code fed each host's local devices.
* Parameters and optimizer state are replicated, except the classifier kernel (E, C) and its
  momentum, which are sharded by class: ``P(None, 'data')`` -- every device holds (E, C/ndev).
* Inside the step the (B, E) embeddings are all-gathered (cheap) and the (B, C) logits stay
  sharded by class, so the kernel is never gathered and millions of classes fit.  The heads use
  one-hot masks and the loss reduces over the class axis, so GSPMD only all-reduces (B,) vectors.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None,
                           cpu_collectives: Optional[str] = None) -> None:
    """``jax.distributed.initialize`` from explicit flags, else from the environment.

    With no arguments JAX detects TPU VMs, SLURM and Open MPI by itself; ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are also honoured.  A single-process run without
    any of these is left alone.  ``cpu_collectives='gloo'`` enables cross-process collectives on CPU.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    auto_env = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"))
    if coordinator_address is None and not auto_env:
        return  # single process
    if coordinator_address is None and "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D 'data' mesh over ``devices`` (default: all devices of all processes).

    The axis type is Auto (not the new Explicit default) so GSPMD propagates shardings through the
    model and ``with_sharding_constraint`` steers the head layout.
    """
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def kernel_sharding(mesh: Mesh) -> NamedSharding:
    """Classifier kernel (E, C): columns (classes) split over devices."""
    return NamedSharding(mesh, P(None, DATA))


def embedding_sharding(mesh: Mesh) -> NamedSharding:
    """(B, E) embeddings inside the head: replicated, i.e. all-gathered from the data shards."""
    return NamedSharding(mesh, P())


def logits_sharding(mesh: Mesh) -> NamedSharding:
    """(B, C) logits: sharded by class like the kernel."""
    return NamedSharding(mesh, P(None, DATA))


def padded_num_classes(num_classes: int, num_devices: int) -> int:
    """Class count rounded up to a multiple of the device count (padding columns are masked)."""
    return -(-num_classes // num_devices) * num_devices


def _is_head_kernel(path) -> bool:
    keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    return "head" in keys and keys[-1] == "kernel"


def state_shardings(mesh: Mesh, state: Any) -> Any:
    """Shardings for a TrainState (or any pytree holding ``params['head']['kernel']`` and optimizer
    slots that mirror it): the head kernel and its slots class-sharded, everything else replicated."""

    def choose(path, leaf):
        if _is_head_kernel(path) and getattr(leaf, "ndim", 0) == 2:
            return kernel_sharding(mesh)
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(choose, state)


def host_to_global(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded along 'data'.

    The global batch is the concatenation of every process's rows in process order.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return {k: put(v) for k, v in batch.items()}


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"config.global_batch_size={global_batch_size} is not divisible by the device count {n}")
    if global_batch_size % jax.process_count():
        raise ValueError(f"config.global_batch_size={global_batch_size} is not divisible by the process count "
                         f"{jax.process_count()}")


def jit_sharded(fn, mesh: Mesh, state_shardings_: Any, *, donate: bool = True,
                compiler_options: Optional[dict] = None):
    """jit ``fn(state, batch) -> (state, metrics)`` on the mesh: state in/out with its shardings,
    batch sharded along 'data', metrics replicated; the input state is donated. ``compiler_options``:
    XLA options for this program (``adaface_jax.compile_options``)."""
    return jax.jit(fn, in_shardings=(state_shardings_, batch_sharding(mesh)),
                   out_shardings=(state_shardings_, replicated(mesh)), donate_argnums=(0,) if donate else (),
                   compiler_options=compiler_options)


def abstract_sharded(init_fn, mesh: Mesh, *args):
    """What ``create_sharded`` would return, as ``jax.ShapeDtypeStruct``s carrying their shardings (nothing
    allocated): for lowering and compiling a step ahead of time."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(mesh, abstract)
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                   shardings)
    return state, shardings


def create_sharded(init_fn, mesh: Mesh, *args):
    """Run ``init_fn(*args)`` under jit with outputs placed directly in their mesh shardings (the
    class-sharded kernel is never materialised whole on one device)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(mesh, abstract)
    return jax.jit(init_fn, out_shardings=shardings)(*args), shardings
