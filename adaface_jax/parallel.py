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

import atexit
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


# --- the distributed environment: what is detected, what must be passed --------------------------------------------

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """How this process joins the run (``distributed_plan``).

    ``mode``: ``'single'`` (no ``jax.distributed``), ``'auto'`` (JAX detects the cluster: Cloud TPU VM,
    SLURM, Open MPI), ``'flags'`` (``--coordinator-address/--num-processes/--process-id``) or ``'env'``
    (``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``). ``coordinator_address``,
    ``num_processes``, ``process_id`` and ``local_device_ids`` are what ``jax.distributed.initialize`` is
    given (None: JAX detects it, or for ``local_device_ids`` keeps every local device unless it restricts
    a SLURM / Open MPI process to the device of its local rank). ``processes`` and ``process`` are the
    expected counts, None where only JAX can tell (a TPU VM's metadata server).
    """
    mode: str
    source: str
    reason: str
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[tuple] = None
    processes: Optional[int] = 1
    process: Optional[int] = 0
    devices: str = "all local devices"

    @property
    def initialize(self) -> bool:
        return self.mode != "single"

    def initialize_kwargs(self) -> dict:
        kwargs = dict(coordinator_address=self.coordinator_address, num_processes=self.num_processes,
                      process_id=self.process_id)
        if self.local_device_ids is not None:
            kwargs["local_device_ids"] = list(self.local_device_ids)
        return kwargs


def _tasks_per_node(spec: str) -> list:
    """SLURM's '8(x2),4' -> [8, 8, 4]."""
    counts = []
    for part in spec.split(","):
        count, _, repeat = part.strip().partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def distributed_plan(environ: Mapping, coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None, *, tpu_vm: bool = False) -> DistributedPlan:
    """The rules, as a pure function of the environment and the ``train`` flags; ``tpu_vm``: JAX found TPU
    chips and libtpu here (``jax._src.cloud_tpu_init.running_in_cloud_tpu_vm``), which no variable tells.

    1. Explicit values: a flag and its variable (``--coordinator-address``/``JAX_COORDINATOR_ADDRESS``,
       ``--num-processes``/``JAX_NUM_PROCESSES``, ``--process-id``/``JAX_PROCESS_ID``) must agree when both are
       set; the process count and id come together (one without the other is refused) with
       0 <= id < count.
    2. The cluster JAX 0.10.2 detects (``jax._src.clusters``), in its order: Open MPI (an ``mpirun`` that
       sets ``OMPI_MCA_orte_hnp_uri``: ``OMPI_COMM_WORLD_SIZE/RANK/LOCAL_RANK``), SLURM (inside ``srun``:
       all of SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID; the coordinator
       is the step's first node), a Cloud TPU VM (``TPU_WORKER_HOSTNAMES`` or ``TPU_PROCESS_ADDRESSES`` with
       ``TPU_WORKER_ID`` and ``MEGASCALE_*`` as GKE sets them, else the VM's metadata server unless
       ``TPU_SKIP_MDS_QUERY``). An explicit count or id that differs from the cluster's is refused; a
       cluster of one process (single-task SLURM, ``mpirun -n 1``, one TPU worker) stays single-process.
    3. Devices: on a GPU cluster JAX gives each SLURM / Open MPI process only the device of its local rank
       (one process per GPU). A node running one task gets all its GPUs instead (counted from
       ``CUDA_VISIBLE_DEVICES``, else ``SLURM_GPUS_ON_NODE``), and a task that sees a single GPU (per-task
       binding) drives that one. ``JAX_LOCAL_DEVICE_IDS`` overrides both (JAX reads it).
    4. Without a cluster: all three explicit values start a run; a coordinator without the counts, or the
       counts without a coordinator, is refused; nothing at all is a single process. ``mpirun`` ranks that
       JAX cannot detect (Open MPI 5) and TPU worker lists on a machine where JAX finds no TPU are refused
       rather than run as independent single processes.

    Raises ``ConfigError`` (one line naming both sources) for every conflict.
    """
    from adaface_jax.errors import ConfigError  # noqa: PLC0415

    def env_int(name: str, minimum: int = 0) -> int:
        text = str(environ.get(name, "")).strip()
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r}: expected an integer") from None
        if value < minimum:
            raise ConfigError(f"{name}={value}: expected at least {minimum}")
        return value

    def explicit(flag: str, value, var: str, minimum: Optional[int] = None):
        """(value, source) from the flag and/or its variable (an integer unless ``minimum`` is None); both
        set and different is a conflict."""
        if value is not None and minimum is not None and value < minimum:
            raise ConfigError(f"{flag}={value}: expected at least {minimum}")
        env_value = None
        if str(environ.get(var, "")).strip():
            env_value = environ[var].strip() if minimum is None else env_int(var, minimum)
        if value is not None and env_value is not None and value != env_value:
            raise ConfigError(f"{flag}={value} but {var}={env_value}: set one of them, or the same value in both")
        if value is not None:
            return value, f"{flag}={value}"
        return env_value, (f"{var}={env_value}" if env_value is not None else None)

    coord, coord_src = explicit("--coordinator-address", coordinator_address or None, "JAX_COORDINATOR_ADDRESS")
    num, num_src = explicit("--num-processes", num_processes, "JAX_NUM_PROCESSES", minimum=1)
    pid, pid_src = explicit("--process-id", process_id, "JAX_PROCESS_ID", minimum=0)
    if (num is None) != (pid is None):
        given, missing = (pid_src, "--num-processes (or JAX_NUM_PROCESSES)") if num is None else \
            (num_src, "--process-id (or JAX_PROCESS_ID)")
        raise ConfigError(f"{given} without {missing}: pass the process count and this process's id together")
    if num is not None and pid >= num:
        raise ConfigError(f"{pid_src} is not below {num_src}: process ids run from 0 to {num - 1}")

    # The cluster JAX will detect, in jax._src.clusters' order.
    cluster = None  # (name, count, count_src, id, id_src, local_rank, tasks_here, what JAX derives)
    if "OMPI_MCA_orte_hnp_uri" in environ:
        size, rank = env_int("OMPI_COMM_WORLD_SIZE", 1), env_int("OMPI_COMM_WORLD_RANK")
        here = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1) if "OMPI_COMM_WORLD_LOCAL_SIZE" in environ else None
        cluster = ("Open MPI", size, f"OMPI_COMM_WORLD_SIZE={size}", rank, f"OMPI_COMM_WORLD_RANK={rank}",
                   env_int("OMPI_COMM_WORLD_LOCAL_RANK"), here, "the coordinator is mpirun's host")
    elif all(v in environ for v in _SLURM_VARS):
        ntasks, procid = env_int("SLURM_NTASKS", 1), env_int("SLURM_PROCID")
        here = None
        try:
            if environ.get("SLURM_STEP_TASKS_PER_NODE") and "SLURM_NODEID" in environ:
                here = _tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])[int(environ["SLURM_NODEID"])]
            elif environ.get("SLURM_STEP_NUM_NODES"):
                nodes = int(environ["SLURM_STEP_NUM_NODES"])
                here = 1 if nodes == ntasks else None
        except (ValueError, IndexError):
            here = None
        cluster = ("SLURM", ntasks, f"SLURM_NTASKS={ntasks}", procid, f"SLURM_PROCID={procid}",
                   env_int("SLURM_LOCALID"), here, "the coordinator is the first node of SLURM_STEP_NODELIST")
    elif tpu_vm and (environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")):
        var = "TPU_PROCESS_ADDRESSES" if environ.get("TPU_PROCESS_ADDRESSES") else "TPU_WORKER_HOSTNAMES"
        per_slice = len(environ[var].split(","))
        slices = env_int("MEGASCALE_NUM_SLICES", 1) if environ.get("MEGASCALE_NUM_SLICES") else None
        slice_id = env_int("MEGASCALE_SLICE_ID") if environ.get("MEGASCALE_SLICE_ID") else 0
        multislice = "MEGASCALE_COORDINATOR_ADDRESS" in environ  # without MEGASCALE_NUM_SLICES: from metadata
        count = per_slice * slices if slices else (None if multislice else per_slice)
        if not str(environ.get("TPU_WORKER_ID", "")).strip():
            raise ConfigError(f"{var} is set but TPU_WORKER_ID is not: JAX needs both to place this TPU worker")
        wid = env_int("TPU_WORKER_ID")
        ident = wid + slice_id * per_slice
        ident_src = f"TPU_WORKER_ID={wid}" + (f", MEGASCALE_SLICE_ID={slice_id}" if slice_id else "")
        cluster = ("Cloud TPU VM", count, f"{var} ({per_slice} workers) x {slices or 1} slice(s)", ident,
                   ident_src, None, None, "the coordinator is the first TPU worker")
    elif tpu_vm and not environ.get("TPU_SKIP_MDS_QUERY"):
        cluster = ("Cloud TPU VM", None, "the TPU VM metadata server", None, "the TPU VM metadata server", None, None,
                   "the workers, this worker's number and the coordinator come from the TPU VM metadata server")

    if cluster is None:
        size = env_int("OMPI_COMM_WORLD_SIZE", 1) if "OMPI_COMM_WORLD_SIZE" in environ else 1
        if num is not None and size > 1 and num != size:
            raise ConfigError(f"{num_src} but OMPI_COMM_WORLD_SIZE={size}: pass the number of mpirun ranks")
        if size > 1 and num is None:
            raise ConfigError(f"OMPI_COMM_WORLD_SIZE={size} but no OMPI_MCA_orte_hnp_uri: JAX detects only an "
                              f"Open MPI 4 mpirun; pass --coordinator-address=HOST:PORT --num-processes={size} "
                              "--process-id=$OMPI_COMM_WORLD_RANK")
        hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
        if len([h for h in hosts.split(",") if h.strip()]) > 1 and num is None:
            var = "TPU_PROCESS_ADDRESSES" if environ.get("TPU_PROCESS_ADDRESSES") else "TPU_WORKER_HOSTNAMES"
            raise ConfigError(f"{var} lists {len(hosts.split(','))} TPU workers but JAX finds no Cloud TPU on this "
                              "machine (no TPU chips, or libtpu missing: pip install 'adaface-jax[tpu]')")
        if num is None:
            if coord is not None:
                raise ConfigError(f"{coord_src} without --num-processes and --process-id (or JAX_NUM_PROCESSES and "
                                  "JAX_PROCESS_ID): no SLURM, Open MPI or Cloud TPU environment supplies them")
            why = "no SLURM step, Open MPI mpirun, Cloud TPU VM or explicit coordinator"
            if "SLURM_JOB_ID" in environ:
                missing = [v for v in _SLURM_VARS if v not in environ]
                why = f"a SLURM job outside an srun step ({', '.join(missing)} unset): one process"
            return DistributedPlan("single", "none", why)
        if coord is None:
            raise ConfigError(f"{num_src} and {pid_src} without a coordinator: pass --coordinator-address=HOST:PORT "
                              "(process 0's host) or set JAX_COORDINATOR_ADDRESS")
        flags = all(src.startswith("--") for src in (coord_src, num_src, pid_src))
        return DistributedPlan("flags" if flags else "env", ", ".join((coord_src, num_src, pid_src)),
                               f"process {pid} of {num}, coordinator {coord}", coord, num, pid,
                               processes=num, process=pid)

    name, count, count_src, ident, ident_src, local_rank, tasks_here, derived = cluster
    if num is not None and count is not None and num != count:
        raise ConfigError(f"{num_src} but {count_src}: leave --num-processes out under {name}, it is detected")
    if pid is not None and ident is not None and pid != ident:
        raise ConfigError(f"{pid_src} but {ident_src}: leave --process-id out under {name}, it is detected")
    processes = num if num is not None else count
    process = pid if pid is not None else ident
    if processes == 1:
        return DistributedPlan("single", name, f"{name} with one process ({count_src})")

    local_ids, devices = None, "all local devices"
    if local_rank is not None and not tpu_vm:  # JAX restricts SLURM / Open MPI processes to one device
        devices = f"GPU {local_rank} only (JAX's default for {name}: one process per GPU, at its local rank)"
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        visible = [d for d in visible.split(",") if d.strip()] if visible is not None else None
        if environ.get("JAX_LOCAL_DEVICE_IDS"):
            devices = f"local devices JAX_LOCAL_DEVICE_IDS={environ['JAX_LOCAL_DEVICE_IDS']}"
        elif tasks_here == 1:
            gpus = len(visible) if visible else (env_int("SLURM_GPUS_ON_NODE") if environ.get("SLURM_GPUS_ON_NODE")
                                                 else None)
            if gpus:
                local_ids, devices = tuple(range(gpus)), f"all {gpus} GPUs of the node (one process per node)"
            else:
                devices += "; one task on this node, but no CUDA_VISIBLE_DEVICES or SLURM_GPUS_ON_NODE counts its GPUs"
        elif visible is not None and len(visible) == 1:
            local_ids, devices = (0,), "the one GPU this task sees (CUDA_VISIBLE_DEVICES, per-task binding)"
        elif visible and local_rank >= len(visible):
            raise ConfigError(f"local rank {local_rank} ({name}) but CUDA_VISIBLE_DEVICES="
                              f"{environ['CUDA_VISIBLE_DEVICES']} shows {len(visible)} GPUs: run at most one process "
                              "per GPU of the node")
    given = [s for s in (coord_src, num_src, pid_src) if s]
    source = name + (f" with {', '.join(given)}" if given else "")
    where = f"process {process if process is not None else '?'} of {processes if processes is not None else '?'}"
    reason = f"{name}: {where} ({count_src}); {derived if coord is None else 'coordinator ' + coord}; {devices}"
    return DistributedPlan("auto", source, reason, coord, num, pid, local_ids, processes, process, devices)


def _running_on_cloud_tpu_vm() -> bool:
    """What JAX decided at import: TPU chips attached and libtpu installed."""
    try:
        from jax._src import cloud_tpu_init  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None,
                           cpu_collectives: Optional[str] = None) -> DistributedPlan:
    """``jax.distributed.initialize`` as ``distributed_plan`` decides from the flags and ``os.environ``.

    With no arguments JAX detects TPU VMs, SLURM (inside ``srun``) and Open MPI by itself;
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are also honoured. A single
    process is left alone. Conflicting settings raise ``ConfigError``. ``local_device_ids`` overrides the
    plan's devices; ``cpu_collectives='gloo'`` enables cross-process collectives on CPU.
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    plan = distributed_plan(os.environ, coordinator_address, num_processes, process_id,
                            tpu_vm=_running_on_cloud_tpu_vm())
    if not plan.initialize:
        logging.info("single process: %s", plan.reason)
        return plan
    kwargs = plan.initialize_kwargs()
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    logging.info("jax.distributed.initialize (%s): %s", plan.mode, plan.reason)
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return plan


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


def process0_decides(value: bool) -> bool:
    """Process 0's ``value``, on every process (one collective; ``value`` itself in a single process).

    For a decision read from a shared folder or bucket, such as "is there a run to resume": processes reach it
    at different moments, and one that looks after process 0 has started writing would see another answer,
    take another branch and block the others in mismatched collectives."""
    if jax.process_count() == 1:
        return bool(value)
    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(value))))


def sum_over_processes(count: int) -> int:
    """The sum of every process's ``count`` (one all-gather: every process must call it at the same point)."""
    if jax.process_count() == 1:
        return int(count)
    return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


# --- one process failing while the others run ----------------------------------------------------------------------
# A process that fails alone leaves the others waiting in the step's collectives, and its own exit then waits in
# jax.distributed's shutdown barrier for them: every process hangs for shutdown_timeout_seconds (300 s by default)
# and aborts with a C++ stack trace. So a failing process writes its one-line error under FAILURE_KEY in the
# coordination service's key-value store and leaves at once (no barrier); every other process watches that key
# from a thread -- its main thread may be blocked in a collective -- and leaves too, saying which process failed.
# Leaving is what kill -9 does to a run: the checkpoints already committed are intact and the run resumes from the
# latest (an orbax save still in flight never reaches its commit, and is not read back). A process killed without a
# word is left to JAX's heartbeat timeout: the service's liveness query (GetAliveTasks) waits for every process it
# asks about, and one stuck in a collective never answers.

FAILURE_KEY = "adaface_jax/failure"
LEFT_KEY = "adaface_jax/left"  # LEFT_KEY/<process>: this process is leaving after a failure
WATCH_POLL_MS = 1000           # a watcher's blocking read: how long an exit waits for the watcher to stop
COORDINATOR_GRACE_S = 5.0      # process 0 (which hosts the service) waits this long for the others to read the key
_leaving = threading.Lock()     # one way out per process: the failing path or the watcher, never both


def _coordination_client():
    """jax.distributed's client, or None in a single process (``jax.distributed.initialize`` never ran)."""
    from jax._src import distributed  # noqa: PLC0415  (the client multihost_utils itself uses)

    return distributed.global_state.client


def is_multiprocess_run() -> bool:
    """Whether jax.distributed joined this process to others (``process_count() > 1`` without starting JAX's
    backend)."""
    return _coordination_client() is not None


def _first_way_out() -> bool:
    """True for the first path leaving this process; a second one waits while the first ends the process."""
    if _leaving.acquire(blocking=False):
        return True
    _leaving.acquire(timeout=2 * COORDINATOR_GRACE_S)
    return False


def _leave(client, status: int) -> None:
    """Exit now with ``status``, without atexit handlers (they would wait in the shutdown barrier), after marking
    this process as leaving and flushing what it said. Process 0 hosts the coordination service: it leaves last,
    once every process has marked itself (or after COORDINATOR_GRACE_S), so none of them loses the service before
    it can say why it stops."""
    try:
        client.key_value_set(f"{LEFT_KEY}/{jax.process_index()}", "1", allow_overwrite=True)
        deadline = time.monotonic() + COORDINATOR_GRACE_S
        while jax.process_index() == 0 and time.monotonic() < deadline:
            if len(client.key_value_dir_get(LEFT_KEY)) >= jax.process_count():
                break
            time.sleep(0.05)
    except Exception:  # noqa: BLE001  (the service went away with another failed process: leave anyway)
        pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def fail_run(message: str, status: int = 1) -> None:
    """This process failed (``message``: its one-line error, already printed): in a multi-process run tell the
    others and exit now with ``status``; a single process returns."""
    client = _coordination_client()
    if client is None or not _first_way_out():
        return
    try:
        client.key_value_set(FAILURE_KEY, f"{jax.process_index()}\t{message}")
    except Exception:  # noqa: BLE001  (another process failed first: the others are already leaving)
        pass
    _leave(client, status)


def peer_failure(timeout_s: float = 0.0) -> Optional[tuple[int, str]]:
    """(process, its one-line error) if another process of this run has failed, waiting up to ``timeout_s``
    for one to say so; None in a single process or when none has."""
    client = _coordination_client()
    if client is None:
        return None
    try:
        value = (client.blocking_key_value_get(FAILURE_KEY, int(timeout_s * 1000)) if timeout_s > 0
                 else client.key_value_try_get(FAILURE_KEY))
    except Exception:  # noqa: BLE001  (NOT_FOUND / DEADLINE_EXCEEDED: nobody failed)
        return None
    process, _, message = value.partition("\t")
    return (int(process), message) if int(process) != jax.process_index() else None


def leave_for_peer_failure(say: Callable[[int, str], str], status: int = 1, wait_s: float = 0.0) -> None:
    """If another process has failed (waiting up to ``wait_s`` for it to say so: a process whose collective failed
    races that process's word), print ``say(process, its message)`` to stderr and exit now with ``status``.
    Returns when none has."""
    found = peer_failure(wait_s)
    if found is None or not _first_way_out():
        return
    print(say(*found), file=sys.stderr, flush=True)
    _leave(_coordination_client(), status)


def watch_for_peer_failure(say: Callable[[int, str], str], status: int = 1) -> Optional[threading.Thread]:
    """Start a daemon thread that leaves this process (``leave_for_peer_failure``) as soon as another one fails;
    it stops at a normal exit, before jax.distributed's shutdown. None in a single process."""
    client = _coordination_client()
    if client is None:
        return None
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                client.blocking_key_value_get(FAILURE_KEY, WATCH_POLL_MS)
            except Exception as e:  # noqa: BLE001
                if "DEADLINE_EXCEEDED" not in str(e):  # the service is unreachable: JAX itself ends the process
                    stop.wait(WATCH_POLL_MS / 1000)
                continue  # nobody failed yet (the loop re-checks ``stop``)
            leave_for_peer_failure(say, status)
            return  # the key is this process's own failure: fail_run is leaving

    thread = threading.Thread(target=watch, name="peer-failure-watch", daemon=True)
    thread.start()

    @atexit.register  # registered after jax's own clean-up, so it runs before it: out of the client first
    def _stop_watching():
        stop.set()
        thread.join(timeout=2 * WATCH_POLL_MS / 1000)

    return thread
