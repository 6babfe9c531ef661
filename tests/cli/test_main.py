"""What every command shares: one-line usage and input errors, --debug tracebacks, bugs keep theirs, and the
refusals and path-argument checks common to many commands."""
import os

import numpy as np
import pytest

from adaface_jax.cli import main
from tests.support.cli_fixtures import fail
from tests.support import REPO
from tests.support.cli_output import one_error_line
from tests.support.datasets import identities, image_folder

CPU_CONFIG = os.path.join(REPO, "configs", "cpu_synthetic.py")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["embed", "--checkpoint"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adaface-jax embed: error:")
    with pytest.raises(SystemExit):
        main(["quickstart", "--identities", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_debug_shows_the_traceback_and_bugs_keep_theirs(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ADAFACE_DEBUG", raising=False)
    argv = ["convert", str(files["text"]), str(tmp_path / "o")]
    plain = fail(capsys, argv, str(files["text"]))
    assert main(["--debug", *argv]) == 1
    debug = capsys.readouterr().err
    assert "Traceback" in debug and debug.strip().splitlines()[-1] == plain
    monkeypatch.setenv("ADAFACE_DEBUG", "1")
    assert main(argv) == 1
    assert "Traceback" in capsys.readouterr().err


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    import adaface_jax.cli.info as info

    def boom(args):
        raise ZeroDivisionError("a real bug")

    monkeypatch.setattr(info, "run", boom)
    with pytest.raises(ZeroDivisionError):
        main(["info"])


# a damaged or unsafe checkpoint, in every command that reads one


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


@pytest.mark.parametrize("command", ["export", "embed", "compare", "train"])
def test_truncated_checkpoint_is_one_line_in_every_command(files, tmp_path, capsys, command):
    assert main(_run_with(command, files["truncated"], tmp_path)) == 1
    one_error_line(capsys, command, "truncated.ckpt")


@pytest.mark.parametrize("command", ["export", "embed", "compare", "train"])
def test_missing_checkpoint_is_one_line_in_every_command(tmp_path, capsys, command):
    missing = tmp_path / "absent.ckpt"
    assert main(_run_with(command, missing, tmp_path)) == 1
    one_error_line(capsys, command, "absent.ckpt")


# path arguments and outputs


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


def test_paths_are_checked_before_anything_is_created(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = identities(tmp_path / "src", classes=2)
    fail(capsys, ["prepare", "folder", src, "gs:/bucket/ds"], "gs:/bucket/ds", "two slashes")
    fail(capsys, ["prepare", "folder", "gs:/bucket/imgs", "out"], "gs:/bucket/imgs")
    fail(capsys, ["synthesize", "gs:/bucket/syn"], "gs:/bucket/syn")
    fail(capsys, ["check", "s4://bucket/ds"], "unsupported URL scheme")
    fail(capsys, ["prepare", "bin", "x.bin", "gs:/bucket/cache"], "gs:/bucket/cache")
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no folder named gs: (or anything else) was made


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


def test_output_path_that_is_a_file(tmp_path, capsys):
    image_folder(tmp_path / "a", classes=2, per_class=1)
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    fail(capsys, ["prepare", "folder", str(tmp_path / "a"), str(target)], str(target), "not a directory")
    fail(capsys, ["synthesize", str(target), "--identities", "2", "--images-per-identity", "1"], str(target))
    assert target.read_text() == "keep me"
