"""Writing files safely: THE atomic writer (a temp file in the target folder, then ``os.replace``) with
its small helpers for bytes, text, JSON, CSV and numpy files, and the pre-flight checks of output
paths, so a command fails before its expensive work, not after. Every file the project writes goes
through ``atomic_path``."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile

import numpy as np

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


TEMP_SUFFIX = ".tmp"


def _process_umask() -> int:
    """The umask, read once at import (setting it to read it back is not thread-safe later on)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def temp_pattern(folder: str, name_pattern: str) -> str:
    """glob pattern of the temp files ``atomic_path`` leaves for targets matching ``name_pattern`` in
    ``folder`` (for cleaning up after a killed run)."""
    return os.path.join(folder, f".{name_pattern}.*{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """``with atomic_path(p) as tmp:`` -- write ``tmp`` (a hidden, unique name next to ``p``, ending in
    ``suffix`` for writers that go by the extension); it is renamed over ``p`` only when the block
    succeeds, and removed otherwise, so ``p`` is either the old file or the whole new one."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix + TEMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        yield tmp
        if os.path.isfile(tmp):  # mkstemp makes it 0600; the file gets what open() would have given it
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", **open_kwargs):
    """``with atomic_write(p) as f: ...``: ``atomic_path`` with the temp file opened in ``mode``."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f


def write_bytes(path: str, data: bytes) -> str:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path


def write_text(path: str, text: str) -> str:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_json(path: str, obj, indent: int = 1, **kwargs) -> str:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, **kwargs)
    return path


def write_csv(path: str, header, rows) -> str:
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def save_npy(path: str, array) -> str:
    with atomic_write(path, "wb") as f:
        np.save(f, array)
    return path


def save_npz(path: str, **arrays) -> str:
    """``np.savez`` (no pickles) written atomically; the folder is created when missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    return path
