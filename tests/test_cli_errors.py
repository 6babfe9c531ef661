"""Bad input through the model commands (convert, export, embed, compare, evaluate --checkpoint,
train --init-from, quickstart): exit status 1, ONE stderr line `adaface-jax <command>: error: ...`
naming the file, no traceback, nothing half-written, earlier outputs intact."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from adaface_jax.cli import main
from adaface_jax.train.state import create_train_state
from torch_reference import build_backbone, randomize_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CONFIG = os.path.join(REPO, "configs", "cpu_synthetic.py")


class RunsCode:
    """A pickle payload that would create ``sentinel`` if it ever ran."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def one_error_line(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"adaface-jax {command}: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good released-style ir_18 .ckpt, its truncated copy, a text file, a malicious pickle, and a
    converted directory."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    backbone = randomize_(build_backbone("ir_18"), seed=1).eval()
    good = tmp / "good.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in backbone.state_dict().items()}}, good)
    data = good.read_bytes()
    truncated = tmp / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    evil = tmp / "evil.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "callbacks": RunsCode(tmp / "pwned")}, evil)
    converted = tmp / "converted"
    assert main(["convert", str(good), str(converted)]) == 0
    return dict(tmp=tmp, good=good, truncated=truncated, text=text, evil=evil, converted=converted,
                sentinel=tmp / "pwned")


@pytest.mark.parametrize("which,needle", [("text", "not a PyTorch checkpoint"), ("truncated", "truncated or corrupt"),
                                          ("missing", "no such checkpoint file"), ("empty", "empty file")])
def test_convert_bad_checkpoint_files(files, tmp_path, capsys, which, needle):
    src = {"text": files["text"], "truncated": files["truncated"], "missing": tmp_path / "nope.ckpt"}.get(which)
    if which == "empty":
        src = tmp_path / "empty.ckpt"
        src.write_bytes(b"")
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out)]) == 1
    one_error_line(capsys, "convert", os.path.basename(str(src)), needle)
    assert not out.exists()


def test_convert_refuses_to_overwrite_and_keeps_the_earlier_output(files, capsys):
    before = (files["converted"] / "adaface_meta.json").read_bytes()
    assert main(["convert", str(files["truncated"]), str(files["converted"])]) == 1
    one_error_line(capsys, "convert", "truncated.ckpt")
    assert main(["convert", str(files["good"]), str(files["converted"])]) == 1
    one_error_line(capsys, "convert", str(files["converted"]), "--force")
    assert (files["converted"] / "adaface_meta.json").read_bytes() == before


def _run_with(command, ckpt, tmp_path):
    """argv of each checkpoint-reading command pointed at ``ckpt``."""
    photo = os.path.join(REPO, "notebooks")  # any path: the checkpoint is read before the photos
    return {
        "convert": ["convert", str(ckpt), str(tmp_path / "conv")],
        "export": ["export", str(ckpt), str(tmp_path / "back.ckpt")],
        "embed": ["embed", photo, "--checkpoint", str(ckpt), "--out", str(tmp_path / "f.npz")],
        "compare": ["compare", photo, photo, "--checkpoint", str(ckpt)],
        "evaluate": ["evaluate", "--protocol", "hq", "--checkpoint", str(ckpt), "--bin", str(tmp_path / "x.bin"),
                     "--out", str(tmp_path / "res")],
        "train": ["train", "--config", CPU_CONFIG, "--workdir", str(tmp_path / "run"), "--init-from", str(ckpt),
                  "--config.data.source=random", "--config.data.num_images=16", "--config.num_classes=4",
                  "--config.model.arch=tiny"],
    }[command]


@pytest.mark.parametrize("command", ["convert", "export", "embed", "compare", "train"])
def test_a_refused_unsafe_pickle_is_one_line_in_every_command(files, tmp_path, capsys, command):
    assert main(_run_with(command, files["evil"], tmp_path)) == 1
    one_error_line(capsys, command, "evil.ckpt", "refusing to call")
    assert not files["sentinel"].exists()


def test_evaluate_refuses_an_unsafe_checkpoint_in_one_line(files, tmp_path, capsys):
    import cv2

    from data_pipeline.bin_reader import write_bin

    face = cv2.imencode(".png", np.full((112, 112, 3), 128, np.uint8))[1].tobytes()
    write_bin(str(tmp_path / "lfw.bin"), [face] * 20, [True, False] * 5)
    argv = ["evaluate", "--protocol", "hq", "--checkpoint", str(files["evil"]), "--bin", str(tmp_path / "lfw.bin"),
            "--out", str(tmp_path / "res")]
    assert main(argv) == 1
    one_error_line(capsys, "evaluate", "evil.ckpt", "refusing to call")
    assert not files["sentinel"].exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("command", ["export", "embed", "compare", "train"])
def test_truncated_checkpoint_is_one_line_in_every_command(files, tmp_path, capsys, command):
    assert main(_run_with(command, files["truncated"], tmp_path)) == 1
    one_error_line(capsys, command, "truncated.ckpt")


@pytest.mark.parametrize("command", ["export", "embed", "compare", "train"])
def test_missing_checkpoint_is_one_line_in_every_command(tmp_path, capsys, command):
    missing = tmp_path / "absent.ckpt"
    assert main(_run_with(command, missing, tmp_path)) == 1
    one_error_line(capsys, command, "absent.ckpt")


def test_damaged_converted_directory_is_one_line(files, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(files["converted"], damaged)
    for root, _, names in os.walk(damaged / "checkpoint"):
        for name in names:
            if name != "_CHECKPOINT_METADATA":
                os.remove(os.path.join(root, name))
    assert main(["export", str(damaged), str(tmp_path / "x.ckpt")]) == 1
    one_error_line(capsys, "export", "damaged")
    (damaged / "adaface_meta.json").write_text("{not json")
    assert main(["export", str(damaged), str(tmp_path / "x.ckpt")]) == 1
    one_error_line(capsys, "export", "adaface_meta.json", "not valid JSON")
    assert not (tmp_path / "x.ckpt").exists()


def test_outputs_are_checked_before_the_work(files, tmp_path, capsys):
    # embed --out pointing at a directory fails before anything is loaded or embedded
    assert main(["embed", str(files["text"]), "--checkpoint", str(files["good"]), "--out", str(tmp_path)]) == 1
    one_error_line(capsys, "embed", str(tmp_path), "is a directory")
    assert main(["embed", "x.png", "--checkpoint", str(files["good"]), "--out",
                 str(tmp_path / "no" / "dir" / "f.npz")]) == 1
    one_error_line(capsys, "embed", "does not exist")
    assert main(["export", str(files["converted"]), str(tmp_path)]) == 1
    one_error_line(capsys, "export", "is a directory")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["quickstart", "--workdir", str(afile)]) == 1
    one_error_line(capsys, "quickstart", "--workdir", "not a directory")
    assert afile.read_text() == "x"


def test_train_bad_config_file_and_fields(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")]) == 1
    one_error_line(capsys, "train", "nope.py", "file not found")
    text = tmp_path / "recipe.txt"
    text.write_text("not python\n")
    assert main(["train", "--config", str(text), "--workdir", str(tmp_path / "w")]) == 1
    one_error_line(capsys, "train", "recipe.txt", "not a Python file")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    assert main(["train", "--config", str(broken), "--workdir", str(tmp_path / "w")]) == 1
    one_error_line(capsys, "train", "broken.py", "SyntaxError")
    assert main(["train", "--config", CPU_CONFIG, "--workdir", str(tmp_path / "w"), "--config.epochs=two"]) == 1
    one_error_line(capsys, "train", "--config.epochs='two'", "expected int")
    assert main(["train", "--config", CPU_CONFIG, "--workdir", str(tmp_path / "w"), "--config.model.arch=ir_77",
                 "--config.data.source=random", "--config.data.num_images=16"]) == 1
    one_error_line(capsys, "train", "config.model.arch='ir_77'")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["embed", "--checkpoint"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adaface-jax embed: error:")
    with pytest.raises(SystemExit):
        main(["quickstart", "--identities", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_debug_shows_the_traceback_and_bugs_keep_theirs(files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ADAFACE_DEBUG"}
    cmd = [sys.executable, "-m", "adaface_jax.cli", "convert", str(files["text"]), str(tmp_path / "o")]
    plain = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()
    via_env = subprocess.run(cmd, env={**env, "ADAFACE_DEBUG": "1"}, capture_output=True, text=True, timeout=120)
    assert "Traceback" in via_env.stderr


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    import adaface_jax.cli.info as info

    def boom(args):
        raise ZeroDivisionError("a real bug")

    monkeypatch.setattr(info, "run", boom)
    with pytest.raises(ZeroDivisionError):
        main(["info"])


def test_state_built_outside_the_loop_can_be_donated():
    """create_train_state gives each counter its own buffer, so donating the whole state works."""
    import optax

    params = {"w": jax.numpy.ones((3,))}
    state = create_train_state(params, {}, None, optax.sgd(0.1), jax.random.PRNGKey(0))
    pointers = [x.unsafe_buffer_pointer() for x in (state.step, state.skipped_in_row, state.skipped_total)]
    assert len(set(pointers)) == 3

    def step(s):
        return s.replace(step=s.step + 1, skipped_total=s.skipped_total + 2)

    out = jax.jit(step, donate_argnums=0)(state)
    assert int(out.step) == 1 and int(out.skipped_total) == 2 and int(out.skipped_in_row) == 0
    np.testing.assert_array_equal(out.params["w"], np.ones(3))


# evaluation, deployment and photo commands

def test_embed_never_overwrites_a_photo_typed_after_out(files, tmp_path, capsys):
    """`embed --align --out photos/img1.jpeg photos/img2.jpeg` (a glob typed after --out): refused in one
    line before any work, the photo unchanged."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("img1.jpeg", "img2.jpeg"):
        (photos / name).write_bytes(b"\xff\xd8\xff\xe0 a JPEG " + name.encode())
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    argv = ["embed", "--checkpoint", str(files["good"]), "--align", "--out", str(photos / "img1.jpeg"),
            str(photos / "img2.jpeg")]
    assert main(argv) == 1
    one_error_line(capsys, "embed", "--out", "img1.jpeg", "expected a file name ending in .npz")
    # an existing .npz that is not an earlier output (a photo renamed, say) is not replaced either
    fake = photos / "faces.npz"
    fake.write_bytes(before["img1.jpeg"])
    assert main(["embed", str(photos / "img2.jpeg"), "--checkpoint", str(files["good"]), "--out", str(fake)]) == 1
    one_error_line(capsys, "embed", "faces.npz", "not an earlier .npz output")
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == {**before, "faces.npz": before["img1.jpeg"]}


def _path_commands(files, tmp_path, url):
    """argv of each evaluation/deployment/photo command with ``url`` in one path argument."""
    good, conv = str(files["good"]), str(files["converted"])
    return {
        "embed --out": ["embed", good, "--checkpoint", good, "--out", url],
        "embed photo": ["embed", url, "--checkpoint", good, "--out", str(tmp_path / "f.npz")],
        "embed --checkpoint": ["embed", good, "--checkpoint", url, "--out", str(tmp_path / "f.npz")],
        "compare photo": ["compare", good, url, "--checkpoint", good],
        "compare --checkpoint": ["compare", good, "--checkpoint", url],
        "export SRC": ["export", url, str(tmp_path / "m.onnx")],
        "export OUT": ["export", conv, url + ".onnx"],
        "convert src": ["convert", url, str(tmp_path / "conv")],
        "convert out_dir": ["convert", good, url],
        "calibrate --checkpoint": ["calibrate", "--checkpoint", url, "--features", str(tmp_path / "f.npz")],
        "calibrate --bin": ["calibrate", "--checkpoint", conv, "--bin", url],
        "evaluate --checkpoint": ["evaluate", "--protocol", "hq", "--checkpoint", url, "--bin", good],
    }


@pytest.mark.parametrize("url, needle", [("s4://bucket/x", "unsupported URL scheme 's4:'"),
                                         ("gs:/bucket/x", "two slashes")])
def test_every_path_argument_refuses_an_unknown_scheme_or_a_one_slash_url(files, tmp_path, capsys, monkeypatch,
                                                                          url, needle):
    monkeypatch.chdir(tmp_path)
    for which, argv in _path_commands(files, tmp_path, url).items():
        assert main(argv) == 1, which
        one_error_line(capsys, argv[0], url, needle)
        assert list(tmp_path.iterdir()) == [], which  # no folder named after a scheme, no output


# data commands

def _data_path_commands(tmp_path, url):
    """argv of each data command with ``url`` in one path argument (the other paths valid or harmless)."""
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    return {
        "prepare rec SRC": ["prepare", "rec", url, out],
        "prepare rec OUT": ["prepare", "rec", src, url],
        "prepare rec --idx": ["prepare", "rec", src, out, "--idx", url],
        "prepare folder SRC": ["prepare", "folder", url, out],
        "prepare folder OUT": ["prepare", "folder", src, url],
        "prepare list SRC": ["prepare", "list", url, out],
        "prepare list --root": ["prepare", "list", src, out, "--root", url],
        "prepare bin SRC": ["prepare", "bin", url, out],
        "prepare bin OUT": ["prepare", "bin", src, url],
        "synthesize OUT": ["synthesize", url, "--identities", "2", "--images-per-identity", "1"],
        "check DATA_DIR": ["check", url],
    }


@pytest.mark.parametrize("url, needle", [("s4://bucket/x", "unsupported URL scheme 's4:'"),
                                         ("gs:/bucket/x", "two slashes")])
def test_every_data_path_argument_refuses_an_unknown_scheme_or_a_one_slash_url(tmp_path, capsys, monkeypatch, url,
                                                                               needle):
    monkeypatch.chdir(tmp_path)
    for which, argv in _data_path_commands(tmp_path, url).items():
        assert main(argv) == 1, which
        one_error_line(capsys, argv[0], url, needle)
        assert list(tmp_path.iterdir()) == [], which  # no folder named after a scheme, no output


def test_prepare_folder_refuses_layouts_that_would_train_on_the_wrong_classes(tmp_path, capsys):
    """A wrapper folder (casia/CASIA-WebFace/<id>/<img>, the way archives unpack), images with no identity
    folders, identities in a format we do not read: one line each naming the folder, nothing written."""
    import cv2

    face = cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes()
    for ident in ("0001", "0002"):
        (tmp_path / "casia" / "CASIA-WebFace" / ident).mkdir(parents=True)
        (tmp_path / "casia" / "CASIA-WebFace" / ident / "001.jpg").write_bytes(face)
    (tmp_path / "flat").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "flat" / name).write_bytes(face)
    for ident in ("p1", "p2"):
        (tmp_path / "phone" / ident).mkdir(parents=True)
        (tmp_path / "phone" / ident / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    out = tmp_path / "out"
    cases = {"casia": [str(tmp_path / "casia" / "CASIA-WebFace"), "pass"],
             "flat": ["2 images directly", "no identity folders"],
             "phone": ["2 other files: 2 .heic"]}
    for name, needles in cases.items():
        assert main(["prepare", "folder", str(tmp_path / name), str(out)]) == 1, name
        one_error_line(capsys, "prepare", str(tmp_path / name), *needles)
        assert not out.exists(), name


def test_data_outputs_never_replace_a_user_file(tmp_path, capsys):
    import cv2

    face = cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes()
    for ident in ("a", "b"):
        (tmp_path / "imgs" / ident).mkdir(parents=True)
        (tmp_path / "imgs" / ident / "1.jpg").write_bytes(face)
    text = tmp_path / "existing_file.txt"
    text.write_text("keep")
    for argv in (["prepare", "folder", str(tmp_path / "imgs"), str(text)],
                 ["prepare", "bin", str(tmp_path / "v.bin"), str(text)],
                 ["synthesize", str(text), "--identities", "2", "--images-per-identity", "1"]):
        assert main(argv) == 1, argv
        one_error_line(capsys, argv[0], str(text), "not a directory")
    syn = tmp_path / "syn"
    syn.mkdir()
    (syn / "notes.bin").write_text("keep")
    argv = ["synthesize", str(syn), "--identities", "2", "--images-per-identity", "1", "--val-identities", "2",
            "--val-pairs", "2", "--val-name", "notes.bin"]
    assert main(argv) == 1
    one_error_line(capsys, "synthesize", "notes.bin", "not an earlier .bin output")
    assert text.read_text() == "keep" and (syn / "notes.bin").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_file.txt", "imgs", "syn"]
