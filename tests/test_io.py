"""The one atomic writer: all or nothing, and files with the permissions a plain open() would give."""
import os
import stat

import pytest

from adaface_jax import io


def test_written_file_has_umask_permissions_not_mkstemp_0600(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = io.write_text(str(tmp_path / "table.md"), "| a |\n")
    plain = tmp_path / "plain.md"
    plain.write_text("x")
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode) == 0o666 & ~mask


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "result.json"
    io.write_json(str(path), {"old": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_write(str(path), "w") as f:
            f.write('{"new": ')
            raise RuntimeError("killed half-way")
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"old":1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
