"""`adaface-jax export`: a damaged converted directory is one line naming what is wrong, and nothing is written."""
import os
import shutil

from adaface_jax.cli import main
from tests.support.cli_output import one_error_line


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
