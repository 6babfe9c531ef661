"""Checkpoint conversion: released/Lightning .ckpt -> orbax directory -> PyTorch state_dict, the CLI,
load_pretrained, and every kind of bad input (including pickles that try to run code)."""
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

from adaface_jax.cli import main
from adaface_jax.convert import (CheckpointMismatchError, CheckpointReadError, UnsafeCheckpointError,
                                 export_state_dict, read_torch_checkpoint,
                                 state_dict_to_variables)
from adaface_jax.heads import AdaFaceState
from adaface_jax.inference import load_pretrained, to_input
from adaface_jax.weights import load_weights
from tests.support.torch_reference import AdaFace, build_backbone, randomize_, save_released

NUM_CLASSES = 10


class AttributeDict(dict):
    """Stand-in for Lightning's AttributeDict (a dict subclass pickled by reference)."""

    def __getattr__(self, key):
        return self[key]


class HParamsNamespace:
    """A plain object with attributes (pickled as NEWOBJ + BUILD)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class RunsCode:
    """A pickle that calls ``os.system`` when loaded -- must be refused without running."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


class RunsExec:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return exec, (f"open({str(self.sentinel)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A randomized ir_18 + AdaFace head saved in the released form {'state_dict': model.*, head.*}."""
    tmp = tmp_path_factory.mktemp("ckpt")
    backbone = randomize_(build_backbone("ir_18"), seed=11).eval()
    torch.manual_seed(0)
    head = AdaFace(classnum=NUM_CLASSES)
    with torch.no_grad():
        head.batch_mean.fill_(23.5)
        head.batch_std.fill_(7.25)
    sd = {**{"model." + k: v for k, v in backbone.state_dict().items()},
          **{"head." + k: v for k, v in head.state_dict().items()}}
    path = tmp / "released.ckpt"
    torch.save({"state_dict": sd}, path)
    x = np.random.RandomState(5).uniform(-1, 1, (3, 112, 112, 3)).astype(np.float32)
    with torch.no_grad():
        t_emb, t_norm = backbone(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        f_emb, f_norm = backbone(torch.from_numpy(x[:, :, ::-1].transpose(0, 3, 1, 2).copy()))
    return dict(tmp=tmp, path=path, sd=sd, backbone=backbone, head=head, x=x, emb=t_emb.numpy(),
                norm=t_norm.numpy(), flip_emb=f_emb.numpy(), flip_norm=f_norm.numpy())


@pytest.fixture(scope="module")
def converted(reference):
    out = reference["tmp"] / "converted"
    assert main(["convert", str(reference["path"]), str(out)]) == 0
    return out


def test_convert_writes_orbax_and_meta(reference, converted):
    meta = json.loads((converted / "adaface_meta.json").read_text())
    sha = hashlib.sha256(reference["path"].read_bytes()).hexdigest()
    assert meta["arch"] == "ir_18" and meta["input_size"] == [112, 112]
    assert meta["channel_order"] == "BGR" and meta["embedding_size"] == 512
    assert meta["head_num_classes"] == NUM_CLASSES and meta["source_sha256"] == sha
    arch, variables, head, meta2 = load_weights(str(converted))
    assert arch == "ir_18" and meta2 == meta
    sd = reference["sd"]
    np.testing.assert_array_equal(head["kernel"], sd["head.kernel"].numpy())
    np.testing.assert_array_equal(head["batch_mean"], [23.5])
    np.testing.assert_array_equal(head["batch_std"], [7.25])
    np.testing.assert_array_equal(variables["batch_stats"]["body_2"]["shortcut_layer_1"]["var"],
                                  sd["model.body.2.shortcut_layer.1.running_var"].numpy())
    np.testing.assert_array_equal(variables["params"]["input_layer_2"]["alpha"],
                                  sd["model.input_layer.2.weight"].numpy())
    # refuses to overwrite without --force
    assert main(["convert", str(reference["path"]), str(converted)]) == 1


def test_export_round_trip_loads_strict_in_pytorch(reference, converted, tmp_path):
    out = tmp_path / "exported.ckpt"
    assert main(["export", str(converted), str(out)]) == 0
    loaded = torch.load(out, map_location="cpu", weights_only=True)
    sd = loaded["state_dict"]
    assert set(sd) == set(reference["sd"])
    backbone = build_backbone("ir_18").eval()
    backbone.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")}, strict=True)
    head = AdaFace(classnum=NUM_CLASSES)
    head.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")}, strict=True)
    for k, v in reference["sd"].items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k  # bit-exact, counts included (7)
    with torch.no_grad():
        emb, norm = backbone(torch.from_numpy(reference["x"].transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(emb.numpy(), reference["emb"])
    np.testing.assert_array_equal(norm.numpy(), reference["norm"])


def test_export_state_dict_from_training_state(reference):
    _, _, variables, _, _ = state_dict_to_variables(reference["sd"])
    kernel = reference["sd"]["head.kernel"].numpy()
    sd = export_state_dict(variables["params"], variables["batch_stats"],
                           {"kernel": kernel, "state": AdaFaceState.create(21.0, 9.0)})
    assert set(sd) == set(reference["sd"])
    assert sd["head.t"].tolist() == [0.0] and sd["head.batch_std"].tolist() == [9.0]
    assert sd["model.input_layer.1.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(sd["model.output_layer.3.weight"],
                                  reference["sd"]["model.output_layer.3.weight"].numpy())
    backbone_only = export_state_dict(variables["params"], variables["batch_stats"])
    assert len(backbone_only) == 179


@pytest.mark.parametrize("source", ["ckpt", "dir"])
def test_load_pretrained_embed_matches_pytorch(reference, converted, source):
    path = reference["path"] if source == "ckpt" else converted
    model = load_pretrained(str(path), batch_size=2)  # 3 images -> 2 batches, last one padded
    assert model.arch == "ir_18" and model.meta["channel_order"] == "BGR"
    emb, norm = model.embed(reference["x"])
    d_emb = np.max(np.abs(emb - reference["emb"]))
    d_norm = np.max(np.abs(norm - reference["norm"]) / reference["norm"])
    print(f"\n[load_pretrained {source}] max|d emb| {d_emb:.3g}, max rel|d norm| {d_norm:.3g}")
    assert emb.shape == (3, 512) and norm.shape == (3, 1) and d_emb <= 1e-4 and d_norm <= 1e-4
    if source == "dir":
        # flip test = pre_norm_vector_add of the original and the width-flipped image
        v = reference["emb"] * reference["norm"] + reference["flip_emb"] * reference["flip_norm"]
        want_norm = np.linalg.norm(v, axis=1, keepdims=True)
        f_emb, f_norm = model.embed(reference["x"], flip_test=True)
        d = np.max(np.abs(f_emb - v / want_norm))
        print(f"[load_pretrained flip] max|d emb| {d:.3g}")
        assert d <= 1e-4 and np.allclose(f_norm, want_norm, rtol=1e-4)
        # uint8 BGR input is normalised like to_input does for RGB
        rgb = np.random.RandomState(1).randint(0, 256, (112, 112, 3), dtype=np.uint8)
        e_float, _ = model.embed(to_input(rgb))
        e_uint8, _ = model.embed(np.ascontiguousarray(rgb[None, :, :, ::-1]))
        np.testing.assert_allclose(e_uint8, e_float, atol=1e-6)
    with pytest.raises(ValueError, match="holds ir_18, not the requested ir_50") if source == "dir" else \
            pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_pretrained(str(path), arch="ir_50")


def test_to_input_matches_original_formula():
    from PIL import Image

    rgb = np.random.RandomState(0).randint(0, 256, (112, 112, 3), dtype=np.uint8)
    x = to_input(rgb)
    assert x.shape == (1, 112, 112, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, ..., 0], (rgb[..., 2] / 255.0 - 0.5) / 0.5, atol=1e-7)  # B first
    np.testing.assert_allclose(x[0, ..., 2], (rgb[..., 0] / 255.0 - 0.5) / 0.5, atol=1e-7)
    np.testing.assert_array_equal(to_input(Image.fromarray(rgb)), x)
    with pytest.raises(ValueError, match="aligned 112x112"):
        to_input(rgb[:100])


# ----------------------------------------------------------------------------- bad inputs


def test_wrong_arch_names_keys_and_suggests_the_right_one(reference, tmp_path, capsys):
    assert main(["convert", str(reference["path"]), str(tmp_path / "o"), "--arch", "ir_50"]) == 1
    err = capsys.readouterr().err
    assert str(reference["path"]) in err and "model.body.23.res_layer.5.running_var" in err
    assert "look like ir_18" in err
    assert not (tmp_path / "o" / "checkpoint").exists()
    assert main(["convert", str(reference["path"]), str(tmp_path / "o2"), "--arch", "ir_1000"]) == 1
    assert "unknown arch 'ir_1000'" in capsys.readouterr().err


def test_missing_unexpected_and_misshaped_keys_in_one_error(reference):
    sd = dict(reference["sd"])
    del sd["model.body.0.res_layer.1.weight"]
    sd["model.body.0.res_layer.9.weight"] = torch.zeros(3)
    sd["model.output_layer.3.bias"] = torch.zeros(511)
    sd["head.extra"] = torch.zeros(1)
    sd["optimizer_leftover"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        state_dict_to_variables(sd)
    e = info.value
    assert e.missing == ["model.body.0.res_layer.1.weight"]
    assert e.unexpected == ["model.body.0.res_layer.9.weight", "head.extra", "optimizer_leftover"]
    assert [m[0] for m in e.shape_mismatch] == ["model.output_layer.3.bias"]
    msg = str(e)
    for key in ("model.body.0.res_layer.1.weight", "model.body.0.res_layer.9.weight", "head.extra",
                "model.output_layer.3.bias has (511,), expected (512,)"):
        assert key in msg


def test_truncated_empty_and_absent_files(reference, tmp_path):
    data = reference["path"].read_bytes()
    for name, content in (("truncated.ckpt", data[: len(data) // 2]), ("empty.ckpt", b""),
                          ("garbage.ckpt", b"not a checkpoint at all")):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(CheckpointReadError, match=name):
            read_torch_checkpoint(p)
    with pytest.raises(CheckpointReadError, match="no such checkpoint file"):
        read_torch_checkpoint(tmp_path / "absent.ckpt")


@pytest.mark.parametrize("payload", [RunsCode, RunsExec])
@pytest.mark.parametrize("where", ["top", "hyper_parameters", "state_dict"])
def test_pickle_that_runs_code_is_refused_and_does_not_run(reference, tmp_path, payload, where, capsys):
    sentinel = tmp_path / "pwned"
    obj = {"state_dict": dict(reference["sd"])}
    if where == "top":
        obj["callbacks"] = payload(sentinel)
    elif where == "hyper_parameters":
        obj["hyper_parameters"] = AttributeDict(arch="ir_18", evil=payload(sentinel))
    else:
        obj["state_dict"]["model.evil"] = payload(sentinel)
    path = tmp_path / "evil.ckpt"
    torch.save(obj, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to call"):
        read_torch_checkpoint(path)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    assert "refusing to call" in capsys.readouterr().err
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained(str(path))
    assert not sentinel.exists()
    # sanity: the payload really is live (unrestricted pickle would run it)
    pickle.loads(pickle.dumps(payload(sentinel)))
    assert sentinel.exists()


def test_full_lightning_checkpoint_loads_through_restricted_unpickler(reference, tmp_path):
    sd = reference["sd"]
    ckpt = {
        "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.8.6",
        "state_dict": sd,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {"best_model_score": torch.tensor(0.97),
                                                               "dirpath": "/x"}},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(3)}},
                              "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]}],
        "lr_schedulers": [{"milestones": __import__("collections").Counter({12: 1, 20: 1}), "gamma": 0.1}],
        "NativeMixedPrecisionPlugin": {"scale": 65536.0},
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(arch="ir_18", m=0.4, h=0.333, head="adaface",
                                          ns=HParamsNamespace(lr=0.1, milestones=[12, 20])),
    }
    path = tmp_path / "lightning.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # so the restricted unpickler really is what loads it
    obj = read_torch_checkpoint(path)
    hp = obj["hyper_parameters"]
    assert isinstance(hp, dict) and hp["arch"] == "ir_18" and hp["m"] == 0.4
    assert hp["ns"]["__state__"] == {"lr": 0.1, "milestones": [12, 20]}
    assert obj["epoch"] == 3 and obj["lr_schedulers"][0]["milestones"] == {12: 1, 20: 1}
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out)]) == 0
    _, variables, head, meta = load_weights(str(out))
    assert meta["arch"] == "ir_18" and head["kernel"].shape == (512, NUM_CLASSES)
    np.testing.assert_array_equal(variables["params"]["output_layer_3"]["bias"],
                                  sd["model.output_layer.3.bias"].numpy())


def test_backbone_only_and_bare_state_dicts(reference, tmp_path):
    bare = {k[6:]: v for k, v in reference["sd"].items() if k.startswith("model.")}
    arch, size, variables, head, _ = state_dict_to_variables(bare)
    assert (arch, size, head) == ("ir_18", 112, None)
    path = tmp_path / "backbone.ckpt"
    save_released(bare, path)
    out = tmp_path / "conv"
    assert main(["convert", str(path), str(out), "--arch", "ir_18"]) == 0
    assert json.loads((out / "adaface_meta.json").read_text())["head_num_classes"] is None
    exported = tmp_path / "back.ckpt"
    assert main(["export", str(out), str(exported)]) == 0
    sd = torch.load(exported, weights_only=True)["state_dict"]
    assert len(sd) == 179 and not any(k.startswith("head.") for k in sd)


def test_cli_info_lists_architectures(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for arch in ("ir_18", "ir_50", "ir_101", "ir_se_50", "ir_152"):
        assert arch in out


def test_export_of_a_non_converted_dir_fails_cleanly(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "x.ckpt")]) == 1
    assert "adaface_meta.json missing" in capsys.readouterr().err
