"""``parallel.distributed_plan``: how a process joins a run, from mocked environments (no jax.distributed call).

Each cluster case is also checked against JAX 0.10.2's own detection (``jax._src.clusters``) on the same
variables, so the plan says what JAX will do: the process count and id, and which GPUs a process drives.
"""
import os

import pytest

from adaface_jax.errors import ConfigError
from adaface_jax.parallel import DistributedPlan, distributed_plan

CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR_",
                    "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")

# What a GKE TPU pod (v5e 4x4: four hosts of four chips) has in its environment.
TPU_POD = {"TPU_WORKER_HOSTNAMES": "t-0.svc,t-1.svc,t-2.svc,t-3.svc", "TPU_WORKER_ID": "2",
           "TPU_ACCELERATOR_TYPE": "v5litepod-16", "TPU_TOPOLOGY": "4x4", "TPU_SKIP_MDS_QUERY": "true"}
# A Cloud TPU VM made with `gcloud compute tpus tpu-vm create`: the workers come from the metadata server;
# the variables below may or may not be in a login shell, and JAX reads none of them.
TPU_VM = {"TPU_ACCELERATOR_TYPE": "v4-32", "TPU_NAME": "my-pod"}


def slurm(ntasks, procid, localid, nodes, **extra):
    """Inside `srun --nodes=N --ntasks-per-node=ntasks/N`: what SLURM sets."""
    per_node = ntasks // nodes
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid),
           "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(procid // per_node),
           "SLURM_STEP_NODELIST": "gpu[001-002]" if nodes == 2 else "gpu001", "SLURM_STEP_NUM_NODES": str(nodes),
           "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
           "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_CPUS_ON_NODE": "96"}
    env.update(extra)
    return env


EIGHT_GPUS = "0,1,2,3,4,5,6,7"
OMPI4 = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4",
         "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}


# ---------------------------------------------------------------------------------------------------- single


def test_nothing_set_is_a_single_process():
    plan = distributed_plan({"HOME": "/root", "PATH": "/usr/bin"})
    assert plan == DistributedPlan("single", "none", plan.reason)
    assert not plan.initialize and plan.processes == 1 and plan.process == 0


def test_single_task_slurm_stays_single_process():
    plan = distributed_plan(slurm(1, 0, 0, 1, CUDA_VISIBLE_DEVICES=EIGHT_GPUS))
    assert plan.mode == "single" and "SLURM_NTASKS=1" in plan.reason


def test_slurm_job_outside_srun_is_one_process():
    """An sbatch script or salloc shell: SLURM_NTASKS may say 8, but only srun starts the 8 processes, and JAX
    detects SLURM only inside a step."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu[001-002]"}
    plan = distributed_plan(env)
    assert plan.mode == "single" and "outside an srun step" in plan.reason and "SLURM_STEP_NODELIST" in plan.reason


def test_tpu_vm_without_metadata_or_workers_is_single():
    plan = distributed_plan({"TPU_SKIP_MDS_QUERY": "1"}, tpu_vm=True)
    assert plan.mode == "single"


def test_one_tpu_worker_is_single():
    plan = distributed_plan({**TPU_POD, "TPU_WORKER_HOSTNAMES": "t-0.svc", "TPU_WORKER_ID": "0"}, tpu_vm=True)
    assert plan.mode == "single" and "Cloud TPU VM" in plan.reason


# ---------------------------------------------------------------------------------------------------- TPU VMs


def test_tpu_pod_from_worker_hostnames():
    plan = distributed_plan(TPU_POD, tpu_vm=True)
    assert (plan.mode, plan.processes, plan.process) == ("auto", 4, 2)
    assert plan.initialize_kwargs() == dict(coordinator_address=None, num_processes=None, process_id=None)
    assert plan.local_device_ids is None and plan.devices == "all local devices"


def test_tpu_multislice_counts_every_slice():
    env = {**TPU_POD, "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1", "TPU_WORKER_ID": "3",
           "MEGASCALE_COORDINATOR_ADDRESS": "t-0.svc"}
    plan = distributed_plan(env, tpu_vm=True)
    assert (plan.processes, plan.process) == (8, 7)


def test_tpu_vm_asks_the_metadata_server():
    """`gcloud compute tpus tpu-vm create`: no worker list in the environment; JAX reads the VM's metadata."""
    plan = distributed_plan(TPU_VM, tpu_vm=True)
    assert plan.mode == "auto" and plan.source == "Cloud TPU VM"
    assert (plan.processes, plan.process) == (None, None)
    assert "metadata server" in plan.reason
    assert plan.initialize_kwargs() == dict(coordinator_address=None, num_processes=None, process_id=None)


def test_tpu_variables_without_a_tpu_are_refused():
    """A TPU pod's variables but no TPU for JAX (libtpu not installed): the workers would each train alone."""
    with pytest.raises(ConfigError, match=r"^TPU_WORKER_HOSTNAMES lists 4 TPU workers but JAX finds no Cloud TPU.*"
                                          r"adaface-jax\[tpu\]"):
        distributed_plan(TPU_POD, tpu_vm=False)
    assert distributed_plan(TPU_VM, tpu_vm=False).mode == "single"  # TPU_ACCELERATOR_TYPE alone tells JAX nothing


def test_tpu_worker_list_without_worker_id():
    env = {k: v for k, v in TPU_POD.items() if k != "TPU_WORKER_ID"}
    with pytest.raises(ConfigError, match="TPU_WORKER_HOSTNAMES is set but TPU_WORKER_ID is not"):
        distributed_plan(env, tpu_vm=True)


def test_tpu_explicit_values_are_checked():
    with pytest.raises(ConfigError, match=r"^--num-processes=8 but TPU_WORKER_HOSTNAMES \(4 workers\)"):
        distributed_plan(TPU_POD, None, 8, 2, tpu_vm=True)
    with pytest.raises(ConfigError, match=r"^--process-id=1 but TPU_WORKER_ID=2"):
        distributed_plan(TPU_POD, None, 4, 1, tpu_vm=True)
    # on a VM whose counts come from the metadata server they cannot be checked here: JAX gets them as given
    plan = distributed_plan(TPU_VM, None, 4, 1, tpu_vm=True)
    assert (plan.num_processes, plan.process_id, plan.processes) == (4, 1, 4)


# ---------------------------------------------------------------------------------------------------- SLURM


def test_slurm_one_task_per_gpu():
    """srun --nodes=2 --ntasks-per-node=8: 16 processes, each driving the GPU of its local rank (JAX's rule)."""
    plan = distributed_plan(slurm(16, 11, 3, 2, CUDA_VISIBLE_DEVICES=EIGHT_GPUS))
    assert (plan.mode, plan.source, plan.processes, plan.process) == ("auto", "SLURM", 16, 11)
    assert plan.local_device_ids is None and plan.devices.startswith("GPU 3 only")
    assert plan.initialize_kwargs() == dict(coordinator_address=None, num_processes=None, process_id=None)
    assert "first node of SLURM_STEP_NODELIST" in plan.reason


def test_slurm_one_task_per_node_drives_every_gpu():
    """srun --nodes=2 --ntasks-per-node=1: JAX alone would give each process only GPU 0."""
    plan = distributed_plan(slurm(2, 1, 0, 2, CUDA_VISIBLE_DEVICES=EIGHT_GPUS))
    assert (plan.processes, plan.process) == (2, 1)
    assert plan.local_device_ids == tuple(range(8)) and "all 8 GPUs" in plan.devices
    assert plan.initialize_kwargs()["local_device_ids"] == list(range(8))
    counted = distributed_plan(slurm(2, 0, 0, 2, SLURM_GPUS_ON_NODE="4"))
    assert counted.local_device_ids == (0, 1, 2, 3)
    uncounted = distributed_plan(slurm(2, 0, 0, 2))  # GPUs not requested through SLURM: JAX's default stands
    assert uncounted.local_device_ids is None and "counts its GPUs" in uncounted.devices


def test_slurm_per_task_gpu_binding():
    """srun --ntasks-per-node=8 --gpus-per-task=1: each task sees one GPU, device 0 of its own list."""
    plan = distributed_plan(slurm(16, 13, 5, 2, CUDA_VISIBLE_DEVICES="5"))
    assert plan.local_device_ids == (0,) and "the one GPU this task sees" in plan.devices


def test_slurm_more_tasks_than_gpus():
    with pytest.raises(ConfigError, match=r"^local rank 5 \(SLURM\) but CUDA_VISIBLE_DEVICES=0,1 shows 2 GPUs"):
        distributed_plan(slurm(16, 13, 5, 2, CUDA_VISIBLE_DEVICES="0,1"))


def test_slurm_jax_local_device_ids_wins():
    plan = distributed_plan(slurm(2, 0, 0, 2, CUDA_VISIBLE_DEVICES=EIGHT_GPUS, JAX_LOCAL_DEVICE_IDS="0,1"))
    assert plan.local_device_ids is None and "JAX_LOCAL_DEVICE_IDS=0,1" in plan.devices


def test_slurm_with_flags():
    env = slurm(8, 5, 5, 1, CUDA_VISIBLE_DEVICES=EIGHT_GPUS)
    with pytest.raises(ConfigError, match=r"^--num-processes=4 but SLURM_NTASKS=8: leave --num-processes out"):
        distributed_plan(env, None, 4, 1)
    with pytest.raises(ConfigError, match=r"^--process-id=2 but SLURM_PROCID=5"):
        distributed_plan(env, None, 8, 2)
    agreeing = distributed_plan(env, "gpu001:5555", 8, 5)
    assert agreeing.mode == "auto" and "--coordinator-address=gpu001:5555" in agreeing.source
    assert agreeing.initialize_kwargs() == dict(coordinator_address="gpu001:5555", num_processes=8, process_id=5)
    with pytest.raises(ConfigError, match=r"^JAX_NUM_PROCESSES=2 but SLURM_NTASKS=8"):
        distributed_plan({**env, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})


# ---------------------------------------------------------------------------------------------------- Open MPI


def test_open_mpi_4():
    plan = distributed_plan({**OMPI4, "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert (plan.mode, plan.source, plan.processes, plan.process) == ("auto", "Open MPI", 4, 1)
    assert plan.devices.startswith("GPU 1 only")


def test_open_mpi_that_jax_cannot_detect():
    """Open MPI 5's mpirun sets no OMPI_MCA_orte_hnp_uri: JAX does not detect it."""
    env = {k: v for k, v in OMPI4.items() if k != "OMPI_MCA_orte_hnp_uri"}
    with pytest.raises(ConfigError, match=r"^OMPI_COMM_WORLD_SIZE=4 but no OMPI_MCA_orte_hnp_uri"):
        distributed_plan(env)
    assert distributed_plan(env, "node0:1234", 4, 1).mode == "flags"
    with pytest.raises(ConfigError, match=r"^--num-processes=2 but OMPI_COMM_WORLD_SIZE=4"):
        distributed_plan(env, "node0:1234", 2, 1)


# ---------------------------------------------------------------------------------------------------- explicit


def test_explicit_flags():
    plan = distributed_plan({}, "10.0.0.1:1234", 4, 3)
    assert (plan.mode, plan.processes, plan.process) == ("flags", 4, 3)
    assert plan.initialize_kwargs() == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert plan.source == "--coordinator-address=10.0.0.1:1234, --num-processes=4, --process-id=3"


def test_environment_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    plan = distributed_plan(env)
    assert (plan.mode, plan.processes, plan.process) == ("env", 2, 1)
    assert plan.initialize_kwargs() == dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
    same = distributed_plan(env, "10.0.0.1:1234", 2, 1)  # a flag repeating its variable is fine
    assert same.mode == "flags"
    mixed = distributed_plan({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_PROCESS_ID": "3"}, None, 4, None)
    assert (mixed.mode, mixed.processes, mixed.process) == ("env", 4, 3)


@pytest.mark.parametrize("environ, args, message", [
    ({}, (None, None, 1), r"^--process-id=1 without --num-processes \(or JAX_NUM_PROCESSES\)"),
    ({}, ("h:1", 4, None), r"^--num-processes=4 without --process-id \(or JAX_PROCESS_ID\)"),
    ({"JAX_PROCESS_ID": "1"}, (None, None, None), r"^JAX_PROCESS_ID=1 without --num-processes"),
    ({}, ("h:1", None, None), r"^--coordinator-address=h:1 without --num-processes and --process-id"),
    ({}, (None, 4, 1), r"^--num-processes=4 and --process-id=1 without a coordinator: pass --coordinator-address"),
    ({}, ("h:1", 4, 4), r"^--process-id=4 is not below --num-processes=4: process ids run from 0 to 3"),
    ({}, ("h:1", 0, 0), r"^--num-processes=0: expected at least 1"),
    ({}, ("h:1", 2, -1), r"^--process-id=-1: expected at least 0"),
    ({"JAX_NUM_PROCESSES": "four", "JAX_PROCESS_ID": "0"}, ("h:1", None, None),
     r"^JAX_NUM_PROCESSES='four': expected an integer"),
    ({"JAX_NUM_PROCESSES": "8"}, ("h:1", 4, 0), r"^--num-processes=4 but JAX_NUM_PROCESSES=8"),
    ({"JAX_COORDINATOR_ADDRESS": "a:1"}, ("b:2", 2, 0), r"^--coordinator-address=b:2 but JAX_COORDINATOR_ADDRESS=a:1"),
])
def test_conflicts_are_one_line_naming_both_sources(environ, args, message):
    with pytest.raises(ConfigError, match=message) as caught:
        distributed_plan(environ, *args)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------------- JAX agrees


@pytest.fixture
def cluster_env(monkeypatch):
    """Replace every cluster variable of this process's environment with the given ones."""
    def apply(env):
        for key in list(os.environ):
            if key.startswith(CLUSTER_PREFIXES):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    return apply


def _jax_detects(local_device_ids=None):
    from jax._src.clusters import ClusterEnv
    return ClusterEnv.auto_detect_unset_distributed_params(None, None, None, local_device_ids, None, 10)


@pytest.mark.parametrize("env", [
    slurm(16, 11, 3, 2, CUDA_VISIBLE_DEVICES=EIGHT_GPUS),
    slurm(2, 1, 0, 2, CUDA_VISIBLE_DEVICES=EIGHT_GPUS),
    slurm(16, 13, 5, 2, CUDA_VISIBLE_DEVICES="5"),
    {**OMPI4, "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
], ids=["slurm-per-gpu", "slurm-per-node", "slurm-gpu-binding", "open-mpi"])
def test_jax_detects_what_the_plan_says(env, cluster_env):
    """JAX's own detection on the same variables: the same count and id, and with the plan's local_device_ids
    (or JAX's default where the plan leaves them unset) the GPUs the plan names."""
    plan = distributed_plan(env)
    cluster_env(env)
    coordinator, count, ident, local = _jax_detects(plan.local_device_ids and list(plan.local_device_ids))
    assert (count, ident) == (plan.processes, plan.process)
    assert coordinator  # derived by JAX: the first SLURM node or mpirun's host, with a port from the job id
    if plan.local_device_ids is None:
        local_rank = int(env.get("SLURM_LOCALID", env.get("OMPI_COMM_WORLD_LOCAL_RANK")))
        assert local == [local_rank] and plan.devices.startswith(f"GPU {local_rank} only")
    else:
        assert list(local) == list(plan.local_device_ids)


def test_jax_detects_no_cluster_where_the_plan_sees_none(cluster_env):
    for env in ({}, {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, TPU_VM):
        assert distributed_plan(env).mode == "single"
        cluster_env(env)
        assert _jax_detects() == (None, None, None, None)


def test_jax_reads_a_tpu_pod_as_the_plan_does(cluster_env, monkeypatch):
    """JAX's GKE TPU detection (what TPU_WORKER_HOSTNAMES / TPU_WORKER_ID give) on a pretend TPU VM."""
    from jax._src.clusters import cloud_tpu_cluster
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    # (without MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID JAX asks the metadata server, which is not here)
    one_slice = {**TPU_POD, "MEGASCALE_NUM_SLICES": "1", "MEGASCALE_SLICE_ID": "0"}
    for env in (one_slice, {**TPU_POD, "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1", "TPU_WORKER_ID": "3"}):
        plan = distributed_plan(env, tpu_vm=True)
        cluster_env(env)
        assert cloud_tpu_cluster.GkeTpuCluster.is_env_present()
        got = (cloud_tpu_cluster.GkeTpuCluster.get_process_count(), cloud_tpu_cluster.GkeTpuCluster.get_process_id())
        assert got == (plan.processes, plan.process)


def test_initialize_distributed_follows_the_plan(cluster_env, monkeypatch):
    """``initialize_distributed`` hands JAX what the plan says (jax.distributed.initialize is not called)."""
    from adaface_jax import errors, parallel
    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    cluster_env(slurm(2, 1, 0, 2, CUDA_VISIBLE_DEVICES=EIGHT_GPUS))
    plan = parallel.initialize_distributed()
    assert plan.mode == "auto" and calls == [dict(coordinator_address=None, num_processes=None, process_id=None,
                                                  local_device_ids=list(range(8)))]
    cluster_env({})
    assert parallel.initialize_distributed().mode == "single" and len(calls) == 1
    parallel.initialize_distributed("localhost:1234", 2, 1)
    assert calls[-1] == dict(coordinator_address="localhost:1234", num_processes=2, process_id=1)
    with pytest.raises(errors.InputError, match="^--process-id=1 without --num-processes"):
        parallel.initialize_distributed(None, None, 1)
    assert len(calls) == 2
