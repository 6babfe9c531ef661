"""The loop end to end (ir_18 on a tiny synthetic dataset, 8 CPU devices) and fine-tuning init."""
import json
import os
import time

import jax
import ml_collections
import numpy as np
import pytest
import torch

from adaface_jax import parallel
from adaface_jax.models import build_model
from adaface_jax.train.loop import apply_init_from, train
from adaface_jax.train.setup import build_backbone, init_state, make_schedule
from tests.support import REPO as REPO_ROOT
from tests.support.train_fixtures import cpu_config, flip_fused_accuracy

REPO = str(REPO_ROOT)


@pytest.fixture(scope="module")
def synth16(tmp_path_factory):
    from data_pipeline.synthetic import write_synthetic_dataset, write_verification_bin  # noqa: PLC0415
    d = tmp_path_factory.mktemp("synth16")
    write_synthetic_dataset(str(d), num_identities=4, images_per_identity=4, seed=0, show_progress=False)
    write_verification_bin(str(d / "tiny_val.bin"), num_identities=4, num_pairs=10, seed=0)
    return str(d)


def test_ir18_two_steps_with_validation_checkpoints_and_logs(synth16, tmp_path):
    workdir = str(tmp_path / "run")
    config = cpu_config(synth16, num_classes=4, global_batch_size=8, epochs=1, progress=False,
                        evals__verification__batch_size=8, checkpoint__every_steps=1)
    t0 = time.monotonic()
    summary, state = train(config, workdir, devices=jax.devices()[:2])
    elapsed = time.monotonic() - t0
    assert summary["stop_reason"] == "done" and summary["step"] == 2 and summary["steps_per_epoch"] == 2

    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_logs = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2]
    for r in train_logs:
        assert np.isfinite(r["train/loss"]) and r["train/lr"] == pytest.approx(0.05)
        assert r["train/skipped_total"] == 0
    # images/s: 8 images per logged step over disjoint intervals inside the train() call
    assert 0 < sum(8 / r["train/images_per_sec"] for r in train_logs) <= elapsed
    # AdaFace norm EMA from its initial 20 with t_alpha=0.01, fed by each step's mean feature norm
    n1, n2 = train_logs[0]["train/mean_norm"], train_logs[1]["train/mean_norm"]
    assert train_logs[1]["train/batch_mean"] == pytest.approx(0.99 * (0.99 * 20 + 0.01 * n1) + 0.01 * n2, rel=1e-5)
    val = [r for r in records if "val/tiny_val_acc" in r]
    assert len(val) == 1 and val[0]["val/mean_acc"] == val[0]["val/tiny_val_acc"]
    # Validation uses the flip test: the accuracy of flip-fused features computed here (PyTorch-style
    # normalisation, width flip, pre_norm_vector_add) with the final weights.
    assert val[0]["val/tiny_val_acc"] == flip_fused_accuracy(
        build_model("ir_18"), {"params": state.params["backbone"], "batch_stats": state.batch_stats},
        os.path.join(synth16, "tiny_val.bin"))

    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    assert os.listdir(os.path.join(workdir, "best")) == ["2"]
    assert os.path.getsize(os.path.join(workdir, "training_samples.png")) > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    kernel = state.params["head"]["kernel"]
    assert kernel.shape == (512, 4) and {s.data.shape for s in kernel.addressable_shards} == {(512, 2)}

    # The trained workdir is a checkpoint like any other: load_pretrained embeds with it, and
    # `adaface-jax export` gives a state_dict the PyTorch reference loads with strict=True.
    from tests.support import torch_reference  # noqa: PLC0415

    from adaface_jax.cli import main  # noqa: PLC0415
    from adaface_jax.inference import load_pretrained  # noqa: PLC0415
    x = np.random.RandomState(0).uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)
    model = load_pretrained(workdir)
    emb, norm = model.embed(x)
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
    direct_emb, direct_norm = model.module.apply(jax.device_get(variables), x, train=False)
    np.testing.assert_allclose(emb, direct_emb, atol=1e-5)
    assert main(["export", workdir, str(tmp_path / "trained.ckpt")]) == 0
    sd = torch.load(tmp_path / "trained.ckpt", weights_only=True)["state_dict"]
    backbone = torch_reference.build_backbone("ir_18").eval()
    backbone.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}, strict=True)
    head = torch_reference.AdaFace(classnum=4)
    head.load_state_dict({k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}, strict=True)
    np.testing.assert_allclose(head.kernel.detach().numpy(), np.asarray(kernel), atol=0)
    assert float(head.batch_mean[0]) == pytest.approx(train_logs[1]["train/batch_mean"], rel=1e-6)
    with torch.no_grad():
        t_emb, t_norm = backbone(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(emb, t_emb.numpy(), atol=1e-4)
    np.testing.assert_allclose(norm, t_norm.numpy(), rtol=1e-4)


def test_init_from_pytorch_checkpoint_reinitialises_a_head_of_another_size(tmp_path):
    """--init-from a released-style .ckpt (state_dict with model./head. keys) for a 7-class fine-tune:
    the backbone is the checkpoint's, the 5-class head is dropped."""
    from tests.support import torch_reference  # noqa: PLC0415
    tm = torch_reference.randomize_(torch_reference.build_backbone("ir_18"), seed=1)
    sd = {f"model.{k}": v for k, v in tm.state_dict().items()}
    sd.update({"head.kernel": torch.randn(512, 5), "head.t": torch.zeros(1), "head.batch_mean": torch.full((1,), 21.0),
               "head.batch_std": torch.full((1,), 99.0)})
    path = str(tmp_path / "released.ckpt")
    torch.save({"state_dict": sd}, path)

    config = cpu_config("", num_classes=7, data__source="random", data__num_images=16)
    mesh = parallel.make_mesh(jax.devices()[:2])  # two devices: a class-sharded kernel, cheap compile
    model = build_backbone(config, 2)
    state, shardings = init_state(config, model, mesh, make_schedule(config, 2), 8)
    fresh_kernel = np.asarray(state.params["head"]["kernel"])
    tuned = apply_init_from(state, path, config, shardings)
    got = jax.device_get(tuned.params)
    np.testing.assert_array_equal(got["backbone"]["input_layer_0"]["kernel"],
                                  sd["model.input_layer.0.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(got["backbone"]["input_layer_2"]["alpha"], sd["model.input_layer.2.weight"].numpy())
    np.testing.assert_array_equal(jax.device_get(tuned.batch_stats)["input_layer_1"]["var"],
                                  sd["model.input_layer.1.running_var"].numpy())
    np.testing.assert_array_equal(got["head"]["kernel"], fresh_kernel)  # class count differs: fresh head
    assert float(tuned.head_state.batch_mean[0]) == 20.0
    assert tuned.params["head"]["kernel"].sharding.spec == parallel.kernel_sharding(mesh).spec

    # Same class count: the head comes along too (kernel and AdaFace statistics).
    config5 = cpu_config("", num_classes=5, data__source="random", data__num_images=16)
    state5, sh5 = init_state(config5, model, mesh, make_schedule(config5, 2), 8)
    tuned5 = apply_init_from(state5, path, config5, sh5)
    np.testing.assert_array_equal(np.asarray(tuned5.params["head"]["kernel"])[:, :5], sd["head.kernel"].numpy())
    assert float(tuned5.head_state.batch_mean[0]) == 21.0


def test_run_stops_after_consecutive_non_finite_steps_keeping_the_last_good_checkpoint(tmp_path):
    from adaface_jax.train.checkpointer import restore_items  # noqa: PLC0415
    from adaface_jax.train.loop import TooManySkippedSteps  # noqa: PLC0415
    # lr 1e30: step 1 is finite but throws the weights so far that every later loss is NaN.
    config = cpu_config("", num_classes=8, data__source="random", data__num_images=64, data__image_size=16,
                        model__arch="tiny", model__embedding_size=16, global_batch_size=8, total_steps=10, lr=1e30,
                        max_skipped_in_row=3, log_every=1, checkpoint__every_steps=1, progress=False,
                        evals__verification__every_epochs=0)
    workdir = str(tmp_path / "nan")
    with pytest.raises(TooManySkippedSteps, match=r"3 consecutive steps had a non-finite loss or gradient \(step 4\)"):
        train(config, workdir, devices=jax.devices()[:1])
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["train/skipped"] for r in records] == [0, 1, 1, 1]
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == [2, 3]  # keep=2
    items = jax.device_get(restore_items(os.path.join(workdir, "checkpoints", "3")))
    assert int(items["skipped_total"]) == 2
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(items["params"]))


def test_init_from_our_own_workdir_keeps_backbone_and_resizes_head(tmp_path):
    common = dict(data__source="random", data__num_images=32, data__image_size=16, model__arch="tiny",
                  model__embedding_size=16, global_batch_size=8, progress=False, evals__verification__every_epochs=0)
    src = str(tmp_path / "src")
    _, trained = train(cpu_config("", num_classes=6, total_steps=2, **common), src, devices=jax.devices()[:2])

    config = cpu_config("", num_classes=9, **common)
    mesh = parallel.make_mesh(jax.devices()[:1])
    model = build_backbone(config, 1)
    state, shardings = init_state(config, model, mesh, make_schedule(config, 4), 9)
    tuned = apply_init_from(state, src, config, shardings)
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(tuned.params["backbone"])),
                    jax.tree_util.tree_leaves(jax.device_get(trained.params["backbone"]))):
        np.testing.assert_array_equal(a, b)
    assert tuned.params["head"]["kernel"].shape == (16, 9)
    np.testing.assert_array_equal(np.asarray(tuned.params["head"]["kernel"]), np.asarray(state.params["head"]["kernel"]))
    assert int(tuned.step) == 0  # a fine-tune starts its own schedule and data order


def test_released_recipe_runs_from_the_cli_on_a_tiny_dataset(synth16, tmp_path):
    """A recipe file as released (bfloat16 compute, SGD/LR/AdaFace settings untouched), shrunk only in
    data-dependent sizes and width so it runs on CPU in seconds."""
    from adaface_jax.cli import main  # noqa: PLC0415
    workdir = tmp_path / "recipe"
    rc = main(["train", "--config", os.path.join(REPO, "configs", "ir18_casia.py"), "--workdir", str(workdir),
               f"--config.data.data_dir={synth16}", "--config.num_classes=4", "--config.global_batch_size=8",
               "--config.epochs=1", "--config.model.width=16", "--config.progress=false",
               "--config.evals.verification.every_epochs=0"])  # the tiny dataset has no lfw.bin etc.
    assert rc == 0
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_logs = [r for r in records if "train/loss" in r]
    assert train_logs and all(np.isfinite(r["train/loss"]) for r in train_logs)
    assert train_logs[-1]["step"] == 2 and train_logs[-1]["train/lr"] == pytest.approx(0.1)
    assert os.listdir(workdir / "checkpoints") == ["2"]
    meta = json.load(open(workdir / "checkpoints" / "2" / "meta" / "metadata"))
    assert meta["config"]["precision"] == "bfloat16" and meta["config"]["head"]["h"] == 0.333
    assert "half_precision" not in meta["config"] and "debug_step_delay_s" not in meta["config"]


class _NormProbe:
    """A second evaluator type, registered by the test: the mean flip-fused feature norm of the first 8 images
    of the data directory's tiny_val.bin."""

    CONFIG_DEFAULTS = {"every_epochs": 1, "batch_size": 8}

    def __init__(self, images):
        self.images = images

    @classmethod
    def check_spec(cls, spec, where):
        pass

    @classmethod
    def metric_names(cls, spec):
        return ("val/probe_norm",)

    @classmethod
    def from_config(cls, spec, data_dir, *, where):
        from data_pipeline.bin_reader import load_bin  # noqa: PLC0415
        return cls(load_bin(os.path.join(data_dir, "tiny_val.bin"))[0][:8])

    def run(self, embed_fn):
        return {"norm": float(np.mean(embed_fn(self.images)[1]))}

    def scalar_metrics(self, result):
        return {"val/probe_norm": result["norm"]}


def test_a_registered_evaluator_runs_beside_verification_and_picks_the_best_checkpoint(synth16, tmp_path,
                                                                                        monkeypatch):
    """The loop runs every evaluator of config.evals at its own period, with no branch on its name, and keeps in
    best/ the step whose config.checkpoint.best_metric is best by best_mode ('min' here)."""
    from evaluation import evaluators  # noqa: PLC0415
    monkeypatch.setitem(evaluators.EVALUATORS, "norm_probe", _NormProbe)
    config = cpu_config(synth16, num_classes=4, global_batch_size=8, epochs=4, progress=False, sample_grid=False,
                        model__arch="tiny", model__embedding_size=16, evals__verification__every_epochs=2,
                        evals__verification__batch_size=8, checkpoint__every_steps=100,
                        checkpoint__best_metric="val/probe_norm", checkpoint__best_mode="min")
    config.evals.probe = ml_collections.ConfigDict({"type": "norm_probe"})
    workdir = str(tmp_path / "run")
    summary, state = train(config, workdir, devices=jax.devices()[:1])
    assert summary["step"] == 8 and summary["steps_per_epoch"] == 2
    val = {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "train/loss" not in r}
    assert sorted(val) == [2, 4, 6, 8]
    assert [s for s in sorted(val) if "val/mean_acc" in val[s]] == [4, 8]  # verification every 2 epochs
    probe = {s: val[s]["val/probe_norm"] for s in val}
    assert len(set(probe.values())) == 4
    assert os.listdir(os.path.join(workdir, "best")) == [str(min(probe, key=probe.get))]
    # The probe's last value, recomputed from the final weights: ||e(x) n(x) + e(flip x) n(flip x)||.
    from data_pipeline.bin_reader import load_bin  # noqa: PLC0415
    images = load_bin(os.path.join(synth16, "tiny_val.bin"))[0][:8]
    x = (np.asarray(images, np.float32) / 255.0 - 0.5) / 0.5
    module = build_model("tiny", embedding_size=16)
    variables = jax.device_get({"params": state.params["backbone"], "batch_stats": state.batch_stats})
    e, n = module.apply(variables, x, train=False)
    ef, nf = module.apply(variables, x[:, :, ::-1], train=False)
    v = np.asarray(e, np.float64) * np.asarray(n) + np.asarray(ef, np.float64) * np.asarray(nf)
    assert probe[8] == pytest.approx(float(np.mean(np.linalg.norm(v, axis=1))), rel=1e-5)
