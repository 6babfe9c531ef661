"""`adaface-jax convert`: a bad checkpoint file is one line naming it, and an earlier output is never replaced."""
import os

import pytest

from adaface_jax.cli import main
from tests.support.cli_output import one_error_line


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
