"""What the README promises, each checked through the command line (`adaface_jax.cli.main`, in process)
against something computed independently: hand-written inputs, the PyTorch reference, sklearn, brute force."""
import json
import os
import signal
import struct

import cv2
import jax
import numpy as np
import pytest
import torch

import torch_reference
from adaface_jax.cli import main
from cli_fixtures import checkpoint_steps, logged_steps, signalled_run
from data_fixtures import jpeg, read_tfrecord_examples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _examples(out):
    m = _manifest(out)
    return read_tfrecord_examples([os.path.join(out, s["file"]) for s in m["shards"]])


# ------------------------------------------------------------------------------------------ prepare

def _write_rec(path, items):
    """An InsightFace .rec written by hand (dmlc RecordIO framing + mxnet IRHeader 'IfQQ'), no .idx."""
    with open(path, "wb") as f:
        for i, (label, payload) in enumerate(items):
            data = struct.pack("<IfQQ", 0, float(label), i, 0) + payload
            words = np.frombuffer(data[: len(data) // 4 * 4], "<u4")
            assert not (words == 0xCED7230A).any()  # keep the framing trivial: no magic inside the payload
            f.write(struct.pack("<II", 0xCED7230A, len(data)) + data + b"\0" * (-len(data) % 4))


def test_prepare_rec_from_the_command_line(tmp_path, capsys):
    labels = [0, 2, 1, 2, 0, 1, 2]
    items = [(lab, jpeg(i)) for i, lab in enumerate(labels)]
    _write_rec(tmp_path / "train.rec", items)
    out = tmp_path / "rec_out"
    assert main(["prepare", "rec", str(tmp_path / "train.rec"), str(out), "--workers", "0", "--num-shards", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["num_images"] == 7 and printed["num_classes"] == 3 and printed["shards"] == 2
    m = _manifest(out)
    assert m["num_images"] == 7 and m["num_classes"] == 3 and m["class_counts"] == [2, 2, 3]
    got = sorted(_examples(out).values(), key=lambda e: e[0])
    assert got == sorted(((payload, lab) for lab, payload in items), key=lambda e: e[0])  # bytes as stored


def test_prepare_folder_and_list_from_the_command_line(tmp_path):
    root = tmp_path / "faces"
    written = {}  # bytes -> identity folder
    for person, n in (("bob", 3), ("alice", 2), ("carol", 4)):
        (root / person).mkdir(parents=True)
        for k in range(n):
            data = jpeg(100 * len(person) + 10 * n + k)
            (root / person / f"{k}.jpg").write_bytes(data)
            written[data] = person
    out = tmp_path / "folder_out"
    assert main(["prepare", "folder", str(root), str(out), "--workers", "0"]) == 0
    m = _manifest(out)
    assert m["num_images"] == 9 and m["class_names"] == ["alice", "bob", "carol"] and m["class_counts"] == [2, 3, 4]
    ex = _examples(out)
    assert len(ex) == 9 and all(m["class_names"][lab] == written[data] for data, lab in ex.values())

    # list: path<TAB>label relative to --root, labels kept as given
    lines = [f"{p}/{k}.jpg\t{lab}" for p, lab, n in (("bob", 5, 3), ("carol", 1, 4)) for k in range(n)]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out2 = tmp_path / "list_out"
    assert main(["prepare", "list", str(tmp_path / "list.txt"), str(out2), "--root", str(root), "--workers", "0",
                 "--no-shuffle"]) == 0
    m2 = _manifest(out2)
    assert m2["num_images"] == 7 and m2["num_classes"] == 6
    ex2 = _examples(out2)
    want = {(root / line.split("\t")[0]).read_bytes(): int(line.split("\t")[1]) for line in lines}
    assert sorted(ex2.values()) == sorted(want.items())


def test_synthesize_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synthesize", str(out), "--identities", "3", "--images-per-identity", "2", "--val-identities", "4",
                 "--val-pairs", "6", "--workers", "0"]) == 0
    m = _manifest(out)
    assert m["num_images"] == 6 and m["num_classes"] == 3 and m["class_counts"] == [2, 2, 2]
    from data_pipeline.bin_reader import load_bin  # noqa: PLC0415
    from data_pipeline.synthetic import encode, render  # noqa: PLC0415
    ex = _examples(out)
    # each stored image is identity `label`'s rendering (default seed 0), image k of that identity
    for data, label in ex.values():
        assert any(data == encode(render(0, label, k)[0]) for k in range(2)), label
    images, issame = load_bin(str(out / "synthetic_val.bin"))
    assert images.shape == (12, 112, 112, 3) and len(issame) == 6 and int(np.sum(issame)) == 3
    assert np.load(out / "synthetic_val.quality.npy").shape == (12,)


# ---------------------------------------------------------------------------------------------- info

def test_info_params_counts_match_the_pytorch_reference(capsys):
    assert main(["info", "--params"]) == 0
    out = capsys.readouterr().out
    printed = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
               if line.strip().endswith("M parameters")}
    for arch in ("ir_18", "ir_50"):
        n = sum(p.numel() for p in torch_reference.build_backbone(arch).parameters())
        assert printed[arch] == pytest.approx(n / 1e6, abs=0.006), arch


# ------------------------------------------------------------------------------------ embed, convert

@pytest.fixture(scope="module")
def converted_ir18(tmp_path_factory):
    """A random ir_18 in the released layout, converted with `adaface-jax convert`; also the torch model."""
    d = tmp_path_factory.mktemp("ir18")
    tm = torch_reference.randomize_(torch_reference.build_backbone("ir_18"), seed=3).eval()
    torch.save({"state_dict": {f"model.{k}": v for k, v in tm.state_dict().items()}}, d / "released.ckpt")
    assert main(["convert", str(d / "released.ckpt"), str(d / "converted")]) == 0
    return str(d / "converted"), tm


def _torch_embed(tm, bgr_uint8, flip):
    """PyTorch reference: normalised BGR, optional flip fused by pre_norm_vector_add."""
    x = torch.from_numpy(((bgr_uint8.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        e, n = tm(x)
        if not flip:
            return e.numpy(), n.numpy()
        ef, nf = tm(torch.flip(x, dims=[3]))
    v = (e * n + ef * nf).numpy().astype(np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / norm, norm


def test_embed_flip_test_matches_the_pytorch_reference(converted_ir18, tmp_path, capsys):
    ckpt, tm = converted_ir18
    rng = np.random.default_rng(5)
    bgr = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    bgr[..., :56, :] //= 3  # not symmetric: the flip changes the features
    paths = []
    for i, im in enumerate(bgr):
        paths.append(str(tmp_path / f"face{i}.png"))
        cv2.imwrite(paths[-1], im)
    for flip in (True, False):
        out = tmp_path / f"feats_{flip}.npz"
        assert main(["embed", *paths, "--checkpoint", ckpt, "--out", str(out)] + (["--flip-test"] if flip else [])) == 0
        z = np.load(out)
        want_e, want_n = _torch_embed(tm, bgr, flip)
        np.testing.assert_allclose(z["embeddings"], want_e, atol=2e-4)
        np.testing.assert_allclose(z["norms"].reshape(-1, 1), want_n, rtol=2e-4)
        assert z["ok"].all()
    plain, fused = np.load(tmp_path / "feats_False.npz")["embeddings"], np.load(tmp_path / "feats_True.npz")["embeddings"]
    assert np.abs(plain - fused).max() > 1e-2  # the flag really changes what is saved


# ------------------------------------------------------------------------------------------- train

TINY = ["--config.model.arch=tiny", "--config.model.embedding_size=16", "--config.data.source=random",
        "--config.data.num_images=64", "--config.data.image_size=16", "--config.global_batch_size=8",
        "--config.evals.verification.every_epochs=0", "--config.progress=false", "--config.sample_grid=false"]


def _train(workdir, *extra):
    return main(["train", "--config", os.path.join(REPO, "configs", "cpu_synthetic.py"), "--workdir", str(workdir),
                 *TINY, *extra])


def _latest_items(workdir):
    from adaface_jax.checkpoint import restore_items  # noqa: PLC0415
    return jax.device_get(restore_items(os.path.join(str(workdir), "checkpoints", str(checkpoint_steps(workdir)[-1]))))


def test_train_init_from_a_workdir_from_the_command_line(tmp_path):
    src, tuned = tmp_path / "src", tmp_path / "tuned"
    assert _train(src, "--config.num_classes=6", "--config.total_steps=2") == 0
    # lr 0: the one fine-tuning step leaves the parameters where --init-from put them
    assert _train(tuned, "--config.num_classes=9", "--config.total_steps=1", "--config.lr=0.0", "--config.seed=7",
                  "--init-from", str(src)) == 0
    a, b = _latest_items(src), _latest_items(tuned)
    assert int(b["step"]) == 1
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a["params"]["backbone"]),
                            jax.tree_util.tree_leaves(b["params"]["backbone"])):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert b["params"]["head"]["kernel"].shape[1] >= 9  # a fresh 9-class head (padded for the devices)
    # (a fresh initialisation, with this seed or src's, differs: src trained 2 steps at lr 0.05 from seed 42)


def test_sigint_saves_the_step_reached_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "int"
    err, last = signalled_run(run_dir, signal.SIGINT, 100_000, lambda: logged_steps(run_dir), "the first log line")
    assert f"signal {int(signal.SIGINT)}: saved step {last} and stopping" in err
    assert checkpoint_steps(run_dir) == [last]
    assert int(_latest_items(run_dir)["step"]) == last


# ---------------------------------------------------------------------------------------- evaluate

def _evaluate(*argv):
    return main(["evaluate", *argv])


def _results(out):
    return json.loads((out / "results.json").read_text())["results"]


def _pooled_templates(tid_mid, feats):
    """The reference template pooling by hand: mean over the images of each media, sum over media, L2."""
    rows = [line.split() for line in tid_mid]
    out = {}
    for t in sorted({int(r[1]) for r in rows}):
        media = {}
        for (_, tid, mid), f in zip(rows, feats):
            if int(tid) == t:
                media.setdefault(int(mid), []).append(f)
        v = sum(np.mean(fs, axis=0) for fs in media.values())
        out[t] = v / np.linalg.norm(v)
    return out


def _ijb_features(tmp_path, feats):
    path = tmp_path / "ijb_feats.npz"
    np.savez(path, features=feats, norms=np.ones((len(feats), 1), np.float32), fusion=np.array("pre_norm_vector_add"),
             flip_test=np.array(False))
    return str(path)


def test_ijb_unknown_templates_error_or_row0(tmp_path, capsys):
    from eval_fixtures import FEATS, LM, TID_MID, write_meta  # noqa: PLC0415
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415
    pairs = ["10 20 1", "10 30 0", "20 30 0", "40 50 1", "10 40 0", "30 99 1", "30 50 1"]
    write_meta(tmp_path, "IJBC", lm_lines=[f"{n.split()[0]} {LM}" for n in TID_MID], tid_mid=TID_MID, pairs=pairs)
    feats = _ijb_features(tmp_path, FEATS)
    assert _evaluate("--protocol", "ijbc", "--features", feats, "--data", str(tmp_path), "--out",
                     str(tmp_path / "err")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ijbc_template_pair_label.txt" in err[0] and "99" in err[0], err
    assert _evaluate("--protocol", "ijbc", "--features", feats, "--data", str(tmp_path), "--out",
                     str(tmp_path / "row0"), "--unknown-templates", "row0") == 0
    tf = _pooled_templates(TID_MID, FEATS)
    first = min(tf)  # the reference looks an unknown id up as row 0 of the sorted template ids
    scores = [float(tf[int(a)] @ tf.get(int(b), tf[first])) for a, b, _ in (p.split() for p in pairs)]
    labels = [int(p.split()[2]) for p in pairs]
    assert _results(tmp_path / "row0")["verification"]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


@pytest.mark.parametrize("ds", ["IJBB", "IJBC"])
def test_ijb_identification_over_both_galleries_and_the_tie_option(tmp_path, ds):
    """Templates pool every image of the template (face_tid_mid).  With image c = [1,0]: template 10 (a, b, c)
    is [1,0], 30 (e, f) [0,1], 40 (g) [1,-1].  Probe 20 ([1,1]) scores 0.7071 against both 10 and 30 (first
    gallery file, in that order): a tie, and its mate is 10, so rank-1 is 2/2 (stable) or 1/2 (reversed).
    Probe 50 ([2,-1]) is nearest to its mate 40, which is only in the second gallery file (S2 for IJB-B, G2
    for IJB-C): a rank-1 hit only if both gallery files are read."""
    from eval_fixtures import FEATS, LM, TID_MID, write_meta  # noqa: PLC0415
    write_meta(tmp_path, ds, lm_lines=[f"{n.split()[0]} {LM}" for n in TID_MID], tid_mid=TID_MID,
               pairs=["10 20 1", "10 30 0", "40 50 1"], g1=["10,100,a.jpg", "10,100,b.jpg", "30,300,e.jpg"],
               g2=["40,400,g.jpg"], probe=["20,100,d.jpg", "50,400,h.jpg"])
    feats = FEATS.copy()
    feats[2] = [1, 0]
    feats = _ijb_features(tmp_path, feats)
    got = {}
    for tie in ("stable", "reversed"):
        out = tmp_path / tie
        assert _evaluate("--protocol", ds.lower(), "--features", feats, "--data", str(tmp_path), "--out", str(out),
                         "--tie", tie) == 0
        got[tie] = _results(out)["identification"]["rank"]
    assert got["stable"]["1"] == 1.0 and got["reversed"]["1"] == 0.5
    assert got["stable"]["5"] == got["reversed"]["5"] == 1.0


def test_tinyface_tie_and_collision_options(tmp_path, capsys):
    from eval_fixtures import make_tree  # noqa: PLC0415
    make_tree(tmp_path, ["1_p.jpg", "2_p.jpg"], ["1_g.jpg", "2_g.jpg"], ["d_1.jpg"])
    # rows (sorted aligned paths): Probe 1_p, 2_p; Gallery_Match 1_g, 2_g; Gallery_Distractor d_1
    e = np.eye(3, dtype=np.float32)
    feats = np.stack([e[0], e[1], e[0], e[2], e[0]])  # probe 1 ties its mate 1_g with the distractor d_1
    np.savez(tmp_path / "tf.npz", features=feats, norms=np.ones((5, 1), np.float32))
    ranks = {}
    for tie in ("stable", "reversed"):
        out = tmp_path / tie
        assert _evaluate("--protocol", "tinyface", "--features", str(tmp_path / "tf.npz"), "--data", str(tmp_path),
                         "--out", str(out), "--tie", tie) == 0
        ranks[tie] = _results(out)["rank"]
    # probe 2 ([0,1,0]) scores 0 against every gallery image: its mate 2_g is gallery index 1 of 3
    assert ranks["stable"]["1"] == 0.5 and ranks["reversed"]["1"] == 0.0
    assert ranks["stable"]["5"] == ranks["reversed"]["5"] == 1.0

    # a stem shared by a probe and a gallery image: an error naming both, or (reference) the last file wins
    root = tmp_path / "coll"
    make_tree(root, ["1_x.jpg", "2_p.jpg"], ["2_g.jpg"], ["1_x.jpg"])
    capsys.readouterr()
    np.savez(tmp_path / "c.npz", features=np.stack([e[0], e[1], e[1], e[0]]), norms=np.ones((4, 1), np.float32))
    assert _evaluate("--protocol", "tinyface", "--features", str(tmp_path / "c.npz"), "--data", str(root),
                     "--out", str(tmp_path / "c_err")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Probe/1_x.jpg" in err[0] and "Gallery_Distractor/1_x.jpg" in err[0], err
    assert _evaluate("--protocol", "tinyface", "--features", str(tmp_path / "c.npz"), "--data", str(root),
                     "--out", str(tmp_path / "c_last"), "--tinyface-on-collision", "last") == 0
    # rows: Probe 1_x (0), 2_p (1); Gallery_Match 2_g (2); Distractor 1_x (3).  "last": the probe 1_x is
    # read from row 3 ([1,0,0]); it has no mate (label 1 is only the distractor's stem), so only probe 2
    # counts, and 2_p ([0,1,0]) finds its mate 2_g ([0,1,0]) first.
    assert _results(tmp_path / "c_last")["rank"]["1"] == 1.0


def _random_faces(n, seed):
    bgr = np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    bgr[:, :, :40] //= 2  # not mirror-symmetric
    return bgr


@pytest.mark.parametrize("protocol", ["ijbc", "ijbs", "tinyface"])
def test_evaluate_checkpoint_embeds_like_the_pytorch_reference(converted_ir18, tmp_path, protocol):
    """`evaluate --checkpoint` on a tiny on-disk protocol: the features it extracts (--save-features) are the
    PyTorch reference's (flip-fused for IJB-C and TinyFace, raw for IJB-S), and its results are what the
    same features give through `evaluate --features`."""
    from eval_fixtures import IMAGES, TID_MID, make_tree, small_meta, write_protocol  # noqa: PLC0415
    ckpt, tm = converted_ir18
    data = tmp_path / "data"
    flip = protocol != "ijbs"
    if protocol == "ijbc":
        crops = data / "IJBC" / "loose_crop"
        crops.mkdir(parents=True)
        for name, img in zip((n.split()[0] for n in TID_MID), _random_faces(len(TID_MID), 1)):
            cv2.imwrite(str(crops / name), cv2.resize(img, (130, 150)))
        from evaluation import ijb  # noqa: PLC0415
        from adaface_jax.align import iter_warped_crops  # noqa: PLC0415
        faces = np.stack(list(iter_warped_crops(ijb.crop_paths(small_meta(data)), small_meta(data).landmarks)))  # alignment is tested in test_eval_ijb
    elif protocol == "ijbs":
        write_protocol(data / "protocol")
        (data / "image_list_mtcnn_fail_skipped_v1.csv").write_text(
            ",path\n" + "".join(f"{i},{x}\n" for i, x in enumerate(IMAGES)))
        faces = _random_faces(len(IMAGES), 2)
        for rel, img in zip(IMAGES, faces):
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(data / rel), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
        faces = np.stack([cv2.imread(str(data / rel)) for rel in IMAGES])
    else:
        make_tree(data, ["1_p.png", "2_p.png"], ["1_g.png", "2_g.png"], ["d_1.png"])
        from evaluation import tinyface  # noqa: PLC0415
        aligned = tinyface.build_protocol(str(data)).image_paths  # the feature row order (tested elsewhere)
        faces = _random_faces(len(aligned), 3)
        for p, img in zip(aligned, faces):
            cv2.imwrite(p, img)
    saved = tmp_path / "saved.npz"
    assert _evaluate("--protocol", protocol, "--checkpoint", ckpt, "--data", str(data), "--out", str(tmp_path / "a"),
                     "--save-features", str(saved), "--batch-size", "16") == 0
    z = np.load(saved)
    want_e, want_n = _torch_embed(tm, faces, flip)
    np.testing.assert_allclose(z["features"], want_e, atol=2e-4)
    np.testing.assert_allclose(z["norms"].reshape(-1, 1), want_n, rtol=2e-4)
    assert bool(z["flip_test"]) == flip
    assert _evaluate("--protocol", protocol, "--features", str(saved), "--data", str(data), "--out",
                     str(tmp_path / "b")) == 0
    assert _results(tmp_path / "a") == _results(tmp_path / "b")


# ------------------------------------------------------------------------- train(): devices, statistics

def _tiny_config(**over):
    from adaface_jax.train.config_io import apply_overrides, load_config  # noqa: PLC0415
    base = {"model.arch": "tiny", "model.embedding_size": "16", "data.source": "random", "data.num_images": "80000",
            "data.image_size": "16", "num_classes": "8", "global_batch_size": "8", "evals.verification.every_epochs": "0",
            "progress": "false", "sample_grid": "false", "checkpoint.every_steps": "2", "log_every": "1"}
    return apply_overrides(load_config(os.path.join(REPO, "configs", "cpu_synthetic.py")),
                           {**base, **{k: str(v) for k, v in over.items()}})


def _items(state):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.checkpoint_items()))}


def test_resume_on_another_device_count_then_train_on(tmp_path):
    """2 steps on 4 devices, resumed on 2 devices to step 4 == 4 uninterrupted steps on 4 devices (up to
    reduction order, measured ~1e-5 of a momentum trace's scale)."""
    from adaface_jax.train.loop import train  # noqa: PLC0415
    wd, ref_wd = str(tmp_path / "run"), str(tmp_path / "ref")
    _, at2 = train(_tiny_config(total_steps=2), wd, devices=jax.devices()[:4])
    summary, resumed = train(_tiny_config(total_steps=4), wd, devices=jax.devices()[4:6])
    assert summary["step"] == 4 and checkpoint_steps(wd) == [2, 4]
    kernel = resumed.params["head"]["kernel"]
    assert {d.id for d in kernel.sharding.device_set} == {d.id for d in jax.devices()[4:6]}
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 4)}
    _, ref = train(_tiny_config(total_steps=4), ref_wd, devices=jax.devices()[:4])
    got, want, before = _items(resumed), _items(ref), _items(at2)
    assert int(got["['step']"]) == 4
    for k, v in want.items():
        atol = 5e-5 * max(1.0, float(np.abs(v).max())) if k.startswith("['opt_state']") else 5e-5
        np.testing.assert_allclose(got[k], v, atol=atol, rtol=1e-5, err_msg=k)
    moved = max(np.abs(got[k] - before[k]).max() for k in got if k.startswith("['params']"))
    assert moved > 1e-3  # the resumed run really trained on


def test_per_device_stats_gives_the_step_per_device_groups(tmp_path):
    """config.per_device_stats=true on 2 devices: train() runs the step with BatchNorm and AdaFace statistics
    in 2 groups -- the state equals a step built by hand with 2 groups, and differs from the global one."""
    from adaface_jax import parallel  # noqa: PLC0415
    from adaface_jax.heads import head_params  # noqa: PLC0415
    from adaface_jax.train.loop import random_batches, steps_per_epoch, train  # noqa: PLC0415
    from adaface_jax.train.setup import init_state, make_schedule  # noqa: PLC0415
    from adaface_jax.train.step import StepConfig, make_train_step  # noqa: PLC0415
    from adaface_jax.models import TinyBackbone  # noqa: PLC0415
    devices = jax.devices()[:2]
    config = _tiny_config(total_steps=1, per_device_stats="true")
    _, state = train(config, str(tmp_path / "pds"), devices=devices)
    got = _items(state)

    mesh = parallel.make_mesh(devices)
    schedule = make_schedule(config, steps_per_epoch(config, None))
    batch = next(random_batches(config, 0, 8))  # what train() fed at step 0

    def by_hand(groups):
        model = TinyBackbone(embedding_size=16, dtype=jax.numpy.float32, bn_groups=groups)
        s, shardings = init_state(config, model, mesh, schedule, parallel.padded_num_classes(8, 2))
        kernel0 = np.asarray(jax.device_get(s.params["backbone"]["conv"]["kernel"]))
        cfg = StepConfig(head="adaface", head_kwargs=head_params(config.head), num_classes=8, head_num_groups=groups,
                         lr_fn=schedule, embedding_sharding=parallel.embedding_sharding(mesh),
                         logits_sharding=parallel.logits_sharding(mesh))
        step = parallel.jit_sharded(make_train_step(model, cfg), mesh, shardings)
        s, _ = step(s, parallel.host_to_global(batch, mesh))
        return _items(s), kernel0

    grouped, kernel0 = by_hand(2)
    pooled, _ = by_hand(1)
    for k, v in grouped.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(np.abs(got[k] - pooled[k]).max() > 1e-4 for k in got if k.startswith("['params']"))

    # The first BatchNorm's running statistics, by hand (PyTorch conv, SAME padding of a 3x3/2 conv on
    # 16x16 = 0 before, 1 after): momentum 0.1 towards device 0's half of the batch, unbiased variance.
    x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    w = torch.from_numpy(kernel0.transpose(3, 2, 0, 1).copy())
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), w, stride=2).double().numpy()
    for rows, name in ((slice(0, 4), "device 0"), (slice(0, 8), "global")):
        g = y[rows].transpose(1, 0, 2, 3).reshape(y.shape[1], -1)
        mean, var = 0.1 * g.mean(1), 0.9 + 0.1 * g.var(1, ddof=1)
        close = (np.allclose(got["['batch_stats']['bn']['mean']"], mean, atol=1e-5)
                 and np.allclose(got["['batch_stats']['bn']['var']"], var, atol=1e-5))
        assert close == (name == "device 0"), name
