"""Pre-flight plan of a training run: ``adaface-jax train --config X --dry-run [--simulate-devices N]
[--device-memory GB]``.

Builds the run's trainer (``setup.build_trainer``) with an ABSTRACT state (shapes and shardings, nothing
allocated), lowers and compiles the real step for the real global batch on the mesh, and reports per
device:

  * memory: parameters, optimizer state, the classifier shard (kernel columns on this device), and
    XLA's ``memory_analysis()`` of the compiled step (arguments, outputs, aliased = donated, peak
    temporaries); the estimate of the device's need is arguments + outputs - aliased + temporaries +
    code;
  * FLOPs per image: ``program_cost.model_flops`` of the step (its convolutions and matrix products) / global
    batch;
  * bytes moved by collectives per step: every all-gather, all-reduce, reduce-scatter, all-to-all and
    collective-permute of the compiled (partitioned) HLO, counted by the size of its result (per device;
    for ``-start`` async forms the last element of the result tuple, ``-done`` not counted again).
    Collectives inside a loop body (gradient accumulation's scan) are counted once per appearance;
  * whether the run fits ``--device-memory`` GB.

No dataset is read beyond its manifest: the class count comes from ``data_dir``'s manifest when the
directory exists, else ``config.num_classes``.
"""
from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adaface_jax import io, parallel
from adaface_jax.errors import ConfigError, InputError
from adaface_jax.train.config import check_config
from adaface_jax.train.loop import read_data_manifest
from adaface_jax.train.program_cost import collective_bytes, model_flops
from adaface_jax.train.setup import build_trainer

def _device_bytes(tree) -> int:
    """Bytes one device holds of an abstract pytree (each leaf's shard shape under its sharding)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _gb(x: float) -> str:
    return f"{x / 2 ** 30:.3f} GiB"


def class_count(config) -> tuple[int, str]:
    """(classes, where from): the manifest's count when ``config.data.data_dir`` (local or ``gs://``) exists,
    else the config's."""
    d = config.data.data_dir
    if config.data.source == "tfrecord" and d:
        try:
            d = io.check_path(d, "config.data.data_dir")  # a typo'd URL is refused, not taken for a missing folder
        except InputError as e:
            raise ConfigError(str(e)) from e
        if io.isdir(d):
            manifest = read_data_manifest(config)
            return int(manifest["num_classes"]), f"manifest of {d}"
    return int(config.num_classes), "config.num_classes"


def plan(config, *, device_memory_gb: Optional[float] = None, mesh=None) -> dict:
    """Compile the step for ``config`` on ``mesh`` (default: every device) without allocating the state;
    returns the numbers ``format_plan`` prints."""
    mesh = mesh if mesh is not None else parallel.make_mesh()
    n = mesh.devices.size
    num_classes, source = class_count(config)
    config.num_classes = num_classes
    config = check_config(config, num_devices=n, process_count=jax.process_count())
    # Plan the accelerator program: XLA's default kernels and autodiff's backward, without the CPU-only
    # convolution choice and its backward rewrites (a bad value was refused above, as the run would refuse it).
    config.cpu_convolutions = "xla_default"
    trainer = build_trainer(config, mesh, steps_per_epoch=1000, abstract=True)
    b, size = config.global_batch_size, config.data.image_size
    bs = parallel.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=bs),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=bs)}
    t0 = time.perf_counter()
    # The plan never runs the program: skip LLVM's optimisations on CPU (the memory analysis, FLOPs and
    # collectives come from the HLO passes, which they leave unchanged).
    cpu = mesh.devices.flat[0].platform == "cpu"
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} if cpu else None
    compiled = trainer.step.lower(trainer.state, batch).compile(compiler_options=options)
    compile_s = time.perf_counter() - t0
    flops_step = model_flops(trainer.step, trainer.state, batch)

    state = trainer.state
    kernel = state.params["head"]["kernel"]
    params_b = _device_bytes(state.params)
    opt_b = _device_bytes(state.opt_state)
    other_b = _device_bytes({"bs": state.batch_stats, "hs": state.head_state, "ls": state.loss_scale})
    mem = compiled.memory_analysis()
    ma = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in
          ("argument", "output", "alias", "temp", "generated_code")} if mem is not None else {}
    need = (ma.get("argument", 0) + ma.get("output", 0) - ma.get("alias", 0) + ma.get("temp", 0)
            + ma.get("generated_code", 0))
    hlo = compiled.as_text()
    coll = collective_bytes(hlo)
    return {
        "arch": config.model.arch, "head": config.head.name, "precision": config.precision,
        "sample_rate": trainer.step_config.sample_rate, "devices": n, "device_kind": mesh.devices.flat[0].device_kind,
        "global_batch": b, "per_device_batch": b // n, "num_classes": num_classes, "classes_from": source,
        "padded_classes": trainer.padded_classes, "kernel_shard_shape": tuple(kernel.sharding.shard_shape(kernel.shape)),
        "kernel_shard_bytes": _device_bytes(kernel), "param_bytes": params_b, "opt_bytes": opt_b,
        "other_state_bytes": other_b, "memory_analysis": ma, "device_bytes_needed": need,
        "flops_per_device": flops_step / n, "flops_per_image": flops_step / b, "collectives": coll,
        "collective_bytes": sum(v["bytes"] for v in coll.values()), "compile_s": compile_s,
        "device_memory_gb": device_memory_gb,
        "fits": None if device_memory_gb is None else need <= device_memory_gb * 2 ** 30,
        "hlo": hlo,
    }


def format_plan(p: dict) -> str:
    ma = p["memory_analysis"]
    lines = [
        f"dry run: {p['arch']} + {p['head']} (sample_rate {p['sample_rate']:g}), {p['precision']} compute, "
        f"{p['devices']} x {p['device_kind']}",
        f"  batch: global {p['global_batch']}, per device {p['per_device_batch']}; classes {p['num_classes']} "
        f"({p['classes_from']}), padded {p['padded_classes']}, kernel shard {p['kernel_shard_shape']} per device",
        f"  compiled in {p['compile_s']:.1f} s",
        "per device memory:",
        f"  parameters             {_gb(p['param_bytes'])} ({p['param_bytes']} bytes)",
        f"    classifier shard     {_gb(p['kernel_shard_bytes'])} ({p['kernel_shard_bytes']} bytes)",
        f"  optimizer state        {_gb(p['opt_bytes'])} ({p['opt_bytes']} bytes)",
        f"  other state            {_gb(p['other_state_bytes'])} (batch statistics, head state, loss scale)",
        f"  XLA arguments          {_gb(ma.get('argument', 0))}; outputs {_gb(ma.get('output', 0))}; "
        f"donated/aliased {_gb(ma.get('alias', 0))}",
        f"  peak temporaries       {_gb(ma.get('temp', 0))} ({ma.get('temp', 0)} bytes)",
        f"  total needed           {_gb(p['device_bytes_needed'])} ({p['device_bytes_needed']} bytes)",
        f"compute: {p['flops_per_image'] / 1e9:.3f} GFLOP per image "
        "(convolutions and matrix products of the train step); "
        f"{p['flops_per_device'] / 1e12:.4f} TFLOP per device per step",
        f"collectives per step per device: {p['collective_bytes'] / 2 ** 20:.2f} MiB",
    ]
    for kind, v in p["collectives"].items():
        if v["count"]:
            lines.append(f"  {kind:20s} {v['count']:4d} ops  {v['bytes'] / 2 ** 20:10.2f} MiB")
    if p["fits"] is None:
        lines.append("fits: unknown (pass --device-memory GB)")
    else:
        verdict = "yes" if p["fits"] else "NO"
        lines.append(f"fits in {p['device_memory_gb']:g} GB per device: {verdict} "
                     f"(needs {p['device_bytes_needed'] / 1e9:.2f} GB)")
    return "\n".join(lines)


def simulate_devices_flags(flags: str, count: int) -> str:
    """``XLA_FLAGS`` with ``--xla_force_host_platform_device_count=count`` (other flags kept)."""
    kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])
