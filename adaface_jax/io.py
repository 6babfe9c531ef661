"""The one home for files: every path a user gives (a local path or a ``gs://`` URL) is checked, read,
listed and written here, and nowhere else.

Local paths go through ``os``; ``gs://`` goes through ``etils.epath``, the layer orbax uses, whose
backend is ``tf.io.gfile`` (TensorFlow's Cloud Storage client). So a dataset, a workdir or an
output folder can live in a bucket, and every host of a pod sees the same files.

* **Checked first.** ``check_path`` turns what the user typed into the canonical string used
  everywhere (an absolute local path, or ``gs://bucket/key``). An unknown scheme (``s4://``), a URL
  typed with one slash (``gs:/b/x``) or without a bucket is refused in one line: nothing may ever
  create a local folder named after a URL scheme.
* **Atomic outputs on both kinds of storage.** Writers get a local temporary file (``atomic_path``).
  On a local disk it is renamed over the target, as ``os.replace`` does atomically. An object store
  has no rename, but an object appears whole when its upload completes: the temporary file is
  uploaded once, to the final name. Outputs of several files write their marker (a manifest, a
  ``results.json``) last, so an interrupted output never looks finished.
* **Reading.** ``open`` serves both kinds; ``local_copy`` hands libraries that need a real file
  (``torch.load``, OpenCV) a local copy of a remote one.
"""
from __future__ import annotations

import builtins
import contextlib
import csv
import fnmatch
import json
import os
import posixpath
import re
import shutil
import tempfile
from typing import Iterator, List, Union

import numpy as np

from adaface_jax.errors import InputError

PathLike = Union[str, os.PathLike]

# URL schemes served by the file layer (etils.epath's gs:// backend is tf.io.gfile).
REMOTE_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(/*)(.*)$", re.S)


# ----------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------
def _split_scheme(path: str):
    """``(scheme, slashes, rest)`` when ``path`` looks like a URL (``word:/...``), else None."""
    m = _SCHEME.match(path)
    if m is None or (not m.group(2) and "/" not in m.group(3)):
        return None  # 'a:b' is a local file name, not a URL
    return m.group(1), m.group(2), m.group(3)


def is_remote(path: PathLike) -> bool:
    """True for a path in an object store (``gs://...``)."""
    parts = _split_scheme(os.fspath(path))
    return parts is not None and parts[0].lower() in REMOTE_SCHEMES and parts[1] == "//"


def check_path(path: PathLike, what: str = "path") -> str:
    """The canonical form of a user's path: ``gs://bucket/key`` (no trailing slash) or an absolute local
    path. Refuses (InputError, one line naming it) a scheme the file layer does not serve, a URL written
    with one slash, or one without a bucket."""
    text = os.fspath(path)
    if not isinstance(text, str):
        text = text.decode()
    if not text:
        raise InputError(f"{what}: empty path")
    parts = _split_scheme(text)
    if parts is None:
        return os.path.abspath(os.path.expanduser(text))
    scheme, slashes, rest = parts
    supported = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
    if scheme.lower() not in REMOTE_SCHEMES:
        raise InputError(f"{what} {text}: unsupported URL scheme '{scheme}:' (expected a local path or "
                         f"{supported})")
    if slashes != "//":
        raise InputError(f"{what} {text}: not a valid URL (expected {scheme.lower()}://BUCKET/PATH, with two "
                         f"slashes)")
    rest = rest.rstrip("/")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise InputError(f"{what} {text}: no bucket (expected {scheme.lower()}://BUCKET/PATH)")
    return f"{scheme.lower()}://{posixpath.normpath(rest)}" if "/" in rest else f"{scheme.lower()}://{rest}"


def _epath(path: str):
    from etils import epath  # imported on first remote use: local-only runs never need it
    return epath.Path(path)


def join(path: PathLike, *names: str) -> str:
    """``path/name/...`` for either kind of path (URLs always with '/')."""
    path = os.fspath(path)
    return posixpath.join(path, *names) if is_remote(path) else os.path.join(path, *names)


def dirname(path: PathLike) -> str:
    path = os.fspath(path)
    if is_remote(path):
        parent = posixpath.dirname(path.rstrip("/"))
        return parent if parent.count("/") >= 2 and not parent.endswith(":/") else path
    return os.path.dirname(path)


def basename(path: PathLike) -> str:
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


# ----------------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------------
def exists(path: PathLike) -> bool:
    path = os.fspath(path)
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: PathLike) -> bool:
    """A folder (on an object store: a prefix that holds objects)."""
    path = os.fspath(path)
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: PathLike) -> bool:
    path = os.fspath(path)
    if is_remote(path):
        p = _epath(path)
        return p.exists() and not p.is_dir()
    return os.path.isfile(path)


def getsize(path: PathLike) -> int:
    path = os.fspath(path)
    return int(_epath(path).stat().length) if is_remote(path) else os.path.getsize(path)


def listdir(path: PathLike) -> List[str]:
    """Names in a folder, sorted."""
    path = os.fspath(path)
    if is_remote(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(path))


def glob(folder: PathLike, pattern: str) -> List[str]:
    """Paths in ``folder`` whose name matches ``pattern`` (one level, fnmatch rules), sorted."""
    folder = os.fspath(folder)
    if not isdir(folder):
        return []
    return [join(folder, n) for n in listdir(folder) if fnmatch.fnmatchcase(n, pattern)]


def walk(top: PathLike) -> Iterator[tuple]:
    """``os.walk`` for either kind of path: (folder, sorted subfolders, sorted files); one listing per folder
    on an object store (``scandir``)."""
    top = os.fspath(top)
    if not is_remote(top):
        for folder, dirs, files in os.walk(top):
            dirs.sort()
            yield folder, dirs, sorted(files)
        return
    dirs, files, _ = scandir(top)
    yield top, dirs, files
    for d in dirs:
        yield from walk(join(top, d))


# ----------------------------------------------------------------------------------------------------
# Changes
# ----------------------------------------------------------------------------------------------------
def makedirs(path: PathLike) -> str:
    """Create a folder and its parents (an object store has no folders: nothing to do there)."""
    path = os.fspath(path)
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
    return path


def remove(path: PathLike) -> None:
    """Delete a file; a missing one is not an error."""
    path = os.fspath(path)
    if is_remote(path):
        p = _epath(path)
        if p.exists():
            p.unlink()
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def rmtree(path: PathLike) -> None:
    """Delete a folder and everything in it; a missing one is not an error."""
    path = os.fspath(path)
    if is_remote(path):
        p = _epath(path)
        if p.exists():
            p.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def copy(src: PathLike, dst: PathLike) -> str:
    """Copy one file between any two places (local or remote), the target written atomically."""
    src, dst = os.fspath(src), os.fspath(dst)
    with open(src, "rb") as fin, atomic_write(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 8 << 20)
    return dst


def open(path: PathLike, mode: str = "r", **kwargs):  # noqa: A001 - the layer's open
    """``open`` for either kind of path. Writing a remote file uploads it when closed; for outputs use
    ``atomic_write``, which also keeps a failed write from replacing anything."""
    path = os.fspath(path)
    if is_remote(path):
        return _epath(path).open(mode, **kwargs)
    return builtins.open(path, mode, **kwargs)


def read_bytes(path: PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: PathLike) -> str:
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


@contextlib.contextmanager
def local_copy(path: PathLike, suffix: str = ""):
    """``with local_copy(p) as local:`` -- a local file with ``p``'s content, for libraries that need a real
    file name. A local ``p`` is handed over as it is; a remote one is downloaded to a temporary file that
    is removed afterwards."""
    path = os.fspath(path)
    if not is_remote(path):
        yield path
        return
    fd, tmp = tempfile.mkstemp(prefix="adaface-", suffix=suffix or os.path.splitext(basename(path))[1])
    try:
        with os.fdopen(fd, "wb") as fout, open(path, "rb") as fin:
            shutil.copyfileobj(fin, fout, 8 << 20)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------
# Output pre-flight checks
# ----------------------------------------------------------------------------------------------------
# The first bytes of each kind of output the project writes: an existing file is replaced only when it is
# an earlier output of the same kind (a typo such as ``--out photo.jpg`` must never replace a photo).
# A verification .bin is a pickle (InsightFace writes protocols 2-4, which start with the PROTO opcode).
MAGIC = {".npz": b"PK\x03\x04", ".npy": b"\x93NUMPY", ".png": b"\x89PNG\r\n\x1a\n", ".bin": b"\x80",
         ".json": None, ".csv": None, ".txt": None, ".ckpt": None, ".onnx": None}


def _looks_like(path: str, suffix: str) -> bool:
    """Whether the existing file ``path`` holds an output of kind ``suffix`` (its first bytes; JSON parses)."""
    try:
        if suffix == ".json":
            json.loads(read_text(path))
            return True
        magic = MAGIC.get(suffix)
        if magic is None:
            return True
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except (OSError, ValueError):
        return False


def check_output_file(path: PathLike, what: str = "output", suffixes=None) -> str:
    """Fail now (InputError) if ``path`` cannot become a file: it is a directory, or (local) its folder is
    missing, not a folder or not writable. With ``suffixes`` (e.g. ``(".npz",)``), the name must end in one
    of them, and an existing file is replaced only if it holds an earlier output of that kind. Returns the
    canonical path."""
    path = check_path(path, what)
    if isdir(path):
        raise InputError(f"{what} {path}: is a directory, expected a file path")
    if suffixes:
        suffix = os.path.splitext(basename(path))[1].lower()
        if suffix not in suffixes:
            raise InputError(f"{what} {path}: expected a file name ending in {' or '.join(suffixes)}")
        if isfile(path) and not _looks_like(path, suffix):
            raise InputError(f"{what} {path}: exists and is not an earlier {suffix} output; refusing to replace "
                             f"it (choose another name or remove it first)")
    if is_remote(path):
        return path
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        what_is = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise InputError(f"{what} {path}: its folder {folder} {what_is}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{what} {path}: its folder {folder} is not writable")
    return path


def check_output_dir(path: PathLike, what: str = "output directory") -> str:
    """Fail now if ``path`` exists and is not a directory. Returns the canonical path."""
    path = check_path(path, what)
    if exists(path) and not isdir(path):
        raise InputError(f"{what} {path}: exists and is not a directory")
    return path


# ----------------------------------------------------------------------------------------------------
# Atomic writers: THE writer every output goes through
# ----------------------------------------------------------------------------------------------------
TEMP_SUFFIX = ".tmp"


def _process_umask() -> int:
    """The umask, read once at import (setting it to read it back is not thread-safe later on)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def temp_pattern(folder: str, name_pattern: str) -> str:
    """glob pattern (local folders) of the temp files ``atomic_path`` leaves for targets matching
    ``name_pattern`` in ``folder``, for cleaning up after a killed run."""
    return os.path.join(folder, f".{name_pattern}.*{TEMP_SUFFIX}")


def _upload(local: str, path: str) -> None:
    """One upload of a finished local file to its final object name."""
    with builtins.open(local, "rb") as fin, _epath(path).open("wb") as fout:
        shutil.copyfileobj(fin, fout, 8 << 20)


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ""):
    """``with atomic_path(p) as tmp:`` -- write the local file ``tmp`` (ending in ``suffix`` for writers that
    go by the extension); when the block succeeds it replaces ``p`` (renamed over it on a local disk,
    uploaded once to the final object name in a bucket), and it is removed otherwise, so ``p`` is either
    the old file or the whole new one."""
    path = os.fspath(path)
    remote = is_remote(path)
    if remote:
        folder = None
    else:
        path = os.path.abspath(path)
        folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{basename(path)}.", suffix=suffix + TEMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        yield tmp
        if remote:
            _upload(tmp, path)
            os.remove(tmp)
            return
        if os.path.isfile(tmp):  # mkstemp makes it 0600; the file gets what open() would have given it
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", **open_kwargs):
    """``with atomic_write(p) as f: ...``: ``atomic_path`` with the temp file opened in ``mode``."""
    with atomic_path(path) as tmp:
        with builtins.open(tmp, mode, **open_kwargs) as f:
            yield f


def write_bytes(path: PathLike, data: bytes) -> str:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def write_text(path: PathLike, text: str) -> str:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


def write_json(path: PathLike, obj, indent: int = 1, **kwargs) -> str:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, **kwargs)
    return os.fspath(path)


def write_csv(path: PathLike, header, rows) -> str:
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return os.fspath(path)


def save_npy(path: PathLike, array) -> str:
    with atomic_write(path, "wb") as f:
        np.save(f, array)
    return os.fspath(path)


def save_npz(path: PathLike, **arrays) -> str:
    """``np.savez`` (no pickles) written atomically; the folder is created when missing."""
    makedirs(dirname(check_path(path)))
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    return os.fspath(path)


# ----------------------------------------------------------------------------------------------------
# Files for readers, folders for writers
# ----------------------------------------------------------------------------------------------------
def file_info(path: PathLike) -> tuple:
    """``(size in bytes, modification time in ns)`` of a file (an object store gives whole seconds)."""
    path = os.fspath(path)
    if is_remote(path):
        st = _epath(path).stat()
        return int(st.length), int(st.mtime or 0) * 1_000_000_000
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def readable(path: PathLike):
    """What readers that take a file name or a file object (``np.load``, PIL, ``scipy.io.loadmat``) can
    open: a local path as it is, a remote file's content as an in-memory ``BytesIO``."""
    import io as _stdio  # noqa: PLC0415  (this module is the file layer named io)

    path = os.fspath(path)
    return _stdio.BytesIO(read_bytes(path)) if is_remote(path) else path


def check_creatable_dir(path: PathLike, what: str = "output directory") -> str:
    """``check_output_dir``, and a local folder that does not exist yet can be created: the nearest
    existing folder above it is a writable folder. Returns the canonical path."""
    path = check_output_dir(path, what)
    if is_remote(path):
        return path
    d = path
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: cannot create files under {d} (not a writable folder)")
    return path


def publish_dir(local_dir: str, path: PathLike, last=()) -> str:
    """Copy the files of a finished local folder into ``path`` (local or remote; folders are created),
    each file written atomically; the relative paths in ``last`` ('/'-separated) are written last, in
    that order, so that a marker (a results.json, a meta file) appears only after everything else."""
    path = os.fspath(path)
    files = []
    for folder, _, names in walk(local_dir):
        rel = os.path.relpath(folder, local_dir)
        files += [name if rel == "." else "/".join(rel.split(os.sep) + [name]) for name in names]
    order = [f for f in sorted(files) if f not in last] + [f for f in last if f in files]
    for rel in order:
        dst = join(path, *rel.split("/"))
        makedirs(dirname(dst))
        copy(os.path.join(local_dir, *rel.split("/")), dst)
    return path


def scandir(folder: PathLike) -> tuple:
    """``(subfolder names, file names, other names)`` of one folder, each sorted; "other" is what is neither a
    folder nor a regular file (a FIFO, a socket, a device, a broken link), which a reader must not open.
    A folder that cannot be listed raises OSError naming it (``os.walk`` and ``walk`` skip it silently).
    On gs:// it costs one listing: the object store returns subfolders as names ending in '/'."""
    import errno  # noqa: PLC0415

    folder = os.fspath(folder)
    dirs, files, other = [], [], []
    if is_remote(folder):
        import tensorflow as tf  # noqa: PLC0415  (etils.epath's gs:// backend; loaded only for remote paths)

        try:
            names = tf.io.gfile.listdir(folder)
        except tf.errors.OpError as err:
            raise OSError(errno.EIO, " ".join(str(err.message).split()) or type(err).__name__, folder) from None
        for name in names:
            (dirs if name.endswith("/") else files).append(name.rstrip("/"))
        return sorted(set(dirs)), sorted(files), other
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                kind = dirs if entry.is_dir() else files if entry.is_file() else other
            except OSError:  # e.g. a symbolic link loop
                kind = other
            kind.append(entry.name)
    return sorted(dirs), sorted(files), sorted(other)
