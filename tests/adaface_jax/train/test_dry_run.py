"""`adaface-jax train --dry-run`: the step compiled from an abstract state, per-device memory, FLOPs,
collective bytes, fits / does not fit, on simulated devices."""
import os
import re
import subprocess
import sys
import textwrap

import jax
import pytest

from adaface_jax import parallel
from adaface_jax.train import dry_run, program_cost
from adaface_jax.train.setup import build_trainer
from tests.support.cli_fixtures import fail
from tests.support.train_fixtures import E, tiny_config
from tests.support import REPO as REPO_ROOT

REPO = str(REPO_ROOT)


def _env(**extra):
    env = dict(os.environ, ADAFACE_JAX_CACHE="off", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)  # --simulate-devices sets it
    env.update(extra)
    return env


def test_collective_parser_on_hand_written_hlo():
    hlo = textwrap.dedent("""\
        %ag = f32[16,512]{1,0} all-gather(f32[2,512]{1,0} %x), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
        %ar = (f32[64]{0}, bf16[8,8]{1,0}) all-reduce(f32[64]{0} %a, bf16[8,8]{1,0} %b), to_apply=%sum
        %ar2 = s32[] all-reduce(s32[] %c), to_apply=%sum
        %ags = (f32[2,4]{1,0}, f32[16,4]{1,0}) all-gather-start(f32[2,4]{1,0} %y), dimensions={0}
        %agd = f32[16,4]{1,0} all-gather-done((f32[2,4]{1,0}, f32[16,4]{1,0}) %ags)
        %cp = u8[10]{0} collective-permute(u8[10]{0} %z), source_target_pairs={{0,1}}
        %add = f32[16,512]{1,0} add(f32[16,512]{1,0} %ag, f32[16,512]{1,0} %ag)
        """)
    got = program_cost.collective_bytes(hlo)
    assert got["all-gather"] == {"count": 2, "bytes": 16 * 512 * 4 + 16 * 4 * 4}
    assert got["all-reduce"] == {"count": 2, "bytes": 64 * 4 + 64 * 2 + 4}
    assert got["collective-permute"] == {"count": 1, "bytes": 10}
    assert got["reduce-scatter"]["count"] == 0 and got["all-to-all"]["count"] == 0


def test_plan_of_the_tiny_step_on_eight_devices():
    """The abstract plan's per-device bytes equal those of a real, allocated state's device-0 shards;
    the classifier shard is E x padded/8 x 4 bytes; the kernel is never all-gathered whole."""
    c = tiny_config(4001)            # padded to 4008: 501 columns per device
    c.global_batch_size = 16
    p = dry_run.plan(c, device_memory_gb=1.0)
    assert p["devices"] == 8 and p["padded_classes"] == 4008 and p["kernel_shard_shape"] == (E, 501)
    assert p["kernel_shard_bytes"] == E * 501 * 4
    real = build_trainer(tiny_config(4001), parallel.make_mesh(), steps_per_epoch=1000).state

    def dev0_bytes(tree):
        return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree_util.tree_leaves(tree))

    assert p["param_bytes"] == dev0_bytes(real.params)
    assert p["opt_bytes"] == dev0_bytes(real.opt_state)
    ma = p["memory_analysis"]
    assert ma["argument"] >= p["param_bytes"] + p["opt_bytes"] and ma["temp"] > 0
    assert p["fits"] is True and p["device_bytes_needed"] < 2 ** 30
    for shape in program_cost.gathered_shapes(p["hlo"]):
        assert not re.search(r"\b(4008|4001)\b", shape), shape
    assert p["collectives"]["all-reduce"]["count"] > 0  # gradients of the replicated backbone
    assert p["flops_per_image"] > 0
    text = dry_run.format_plan(p)
    assert f"classifier shard     {E * 501 * 4 / 2 ** 30:.3f} GiB ({E * 501 * 4} bytes)" in text
    assert "fits in 1 GB per device: yes" in text


def test_cli_dry_run_on_simulated_devices_and_config_errors(capsys):
    # A new process (`python -m adaface_jax.cli`): --simulate-devices sets the device count before JAX starts. The
    # plan needs no TensorFlow (seconds of start-up): the child names the heavy modules it loaded.
    argv = ["train", "--config", os.path.join(REPO, "configs", "cpu_synthetic.py"), "--dry-run",
            "--config.model.arch=tiny", "--config.model.embedding_size=32", "--config.data.image_size=16",
            "--config.num_classes=1000", "--config.global_batch_size=8", "--config.data.data_dir=/nonexistent"]
    child = ("import runpy, sys\n"
             "try:\n    runpy.run_module('adaface_jax.cli', run_name='__main__', alter_sys=True)\n"
             "except SystemExit as e:\n    rc = e.code\n"
             "print('loaded:', sorted(m for m in ('tensorflow', 'data_pipeline.input') if m in sys.modules))\n"
             "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", child, *argv, "--simulate-devices", "4", "--device-memory", "0.000001"],
                       capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "loaded: []" in out, out
    assert "4 x cpu" in out and "classes 1000 (config.num_classes), padded 1000" in out
    assert f"classifier shard     {32 * 250 * 4 / 2 ** 30:.3f} GiB ({32 * 250 * 4} bytes)" in out
    assert "fits in 1e-06 GB per device: NO" in out
    # The refusals come before anything is compiled: in this process.
    fail(capsys, argv + ["--config.head.sample_rate=1.5"],
         "config.head.sample_rate=1.5: expected 0 < sample_rate <= 1")
    # The plan compiles XLA's default program, but a bad CPU convolution choice is refused as the run would.
    fail(capsys, argv + ["--config.cpu_convolutions=onednn"],
         "config.cpu_convolutions='onednn': expected one of ('eigen', 'xla_default')")


# The WebFace12M recipe's head and batch (617,970 classes, global batch 512) on 8 devices. Whether the classifier
# is ever gathered does not depend on the backbone, so the test plans it with ir_18 (the recipe's ir_101 compiles
# for minutes on 2 cores); the full recipe's plan is a documented command (docs/training.md, "The dry run").
DRY_RUN_ARCH = "ir_18"


def test_webface12m_plan_never_gathers_the_classifier():
    """617,970 classes at global batch 512 on 8 simulated devices: compiled, not allocated."""
    script = textwrap.dedent(f"""\
        import re, sys
        sys.path.insert(0, {REPO!r})
        from adaface_jax.train.config import load_config
        from adaface_jax.train import dry_run, program_cost
        c = load_config({os.path.join(REPO, "configs", "ir101_webface12m.py")!r})
        c.model.arch = {DRY_RUN_ARCH!r}
        p = dry_run.plan(c, device_memory_gb=80)
        print(dry_run.format_plan(p))
        big = [s for s in program_cost.gathered_shapes(p["hlo"])
               if any(int(d) >= 617970 for d in re.findall(r"\\d+", s))]
        print("GATHERED_BIG", len(big), big[:3])
        print("AG", p["collectives"]["all-gather"])
        """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=1800,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    print(out)
    padded = parallel.padded_num_classes(617970, 8)
    assert padded == 617976
    shard = 512 * padded // 8 * 4
    assert f"kernel shard (512, {padded // 8}) per device" in out
    assert f"classifier shard     {shard / 2 ** 30:.3f} GiB ({shard} bytes)" in out
    assert "GATHERED_BIG 0 []" in out
    # parameters = the replicated backbone + the shard; optimizer momentum mirrors the parameters
    params = int(re.search(r"parameters\s+\S+ GiB \((\d+) bytes\)", out).group(1))
    opt = int(re.search(r"optimizer state\s+\S+ GiB \((\d+) bytes\)", out).group(1))
    assert params > shard and abs(opt - params) <= 64
    gflop = float(re.search(r"compute: ([\d.]+) GFLOP per image", out).group(1))
    # forward + backward ~ 3 x forward (ir_18: 2 x 2.6 GMAC, ir_101: 2 x 12.6 GMAC) plus the head's 6 x E x C
    assert 10 < gflop < 40, gflop
    assert "fits in 80 GB per device: yes" in out


def test_class_count_reads_a_manifest_in_a_bucket_and_refuses_a_typed_url(gcs_bucket):
    """The plan's class count comes from the dataset's manifest through the file layer (here in gs://); a URL the
    layer does not serve is refused, not taken for a missing folder (which would plan config.num_classes)."""
    from adaface_jax.errors import ConfigError
    from data_pipeline import synthetic

    synthetic.write_synthetic_dataset(f"{gcs_bucket}/ds", 3, 2, show_progress=False)
    c = tiny_config(1000)
    c.data.source = "tfrecord"
    c.data.data_dir = f"{gcs_bucket}/ds"
    assert dry_run.class_count(c) == (3, f"manifest of {gcs_bucket}/ds")
    c.data.data_dir = f"{gcs_bucket}/nothing-here"
    assert dry_run.class_count(c) == (1000, "config.num_classes")
    for url, needle in (("gs:/bucket/ds", "not a valid URL"), ("s4://bucket/ds", "unsupported URL scheme 's4:'")):
        c.data.data_dir = url
        with pytest.raises(ConfigError, match=needle):
            dry_run.class_count(c)
