"""Writing files safely: one atomic writer (temp file in the target folder, then ``os.replace``) and a
pre-flight check of an output path, so a command fails before its expensive work, not after."""
from __future__ import annotations

import contextlib
import os
import tempfile

from adaface_jax.errors import InputError


def check_output_file(path: str, what: str = "output") -> str:
    """Fail now (InputError) if ``path`` cannot become a file: it is a directory, or its folder is
    missing or not a folder. Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise InputError(f"{what} {path}: is a directory, expected a file path")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        what_is = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise InputError(f"{what} {path}: its folder {folder} {what_is}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{what} {path}: its folder {folder} is not writable")
    return path


def check_output_dir(path: str, what: str = "output directory") -> str:
    """Fail now if ``path`` exists and is not a directory. Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{what} {path}: exists and is not a directory")
    return path


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", **open_kwargs):
    """``with atomic_write(p) as f: ...`` writes a temp file next to ``p`` and renames it over ``p`` only
    when the block succeeds; on an error the temp file is removed and ``p`` is untouched."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
