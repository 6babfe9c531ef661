"""MXNet RecordIO (.rec + .idx) reader and writer, without mxnet.

Layout of one record: uint32 magic 0xced7230a, uint32 `lrec` (low 29 bits: length, top 3 bits: continuation
flag 0=whole, 1=first, 2=middle, 3=last part), the bytes, zero padding to a multiple of 4. The writer splits a
payload wherever the magic word appears at a 4-byte aligned position (the magic itself is implied between
parts), exactly like dmlc-core, so any mxnet reader can read our files. Image records carry an IRHeader
(uint32 flag, float32 label, uint64 id, uint64 id2) followed by `flag` float32 labels when flag > 0.
The `.idx` file holds "key<TAB>byte offset" lines.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from typing import Iterator

import numpy as np

from adaface_jax import io
from adaface_jax.errors import InputError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IRHEADER = struct.Struct("<IfQQ")
_MAX_RECORD = 1 << 29


class CorruptRecordError(InputError):
    """A record whose framing, header or image is broken; names the record index and its byte offset.
    Picklable, so an error raised in a converter worker process arrives intact in the parent."""

    def __init__(self, path: str, index: int, offset: int, reason: str):
        super().__init__(f"{path}: corrupt record {index} at byte offset {offset}: {reason}")
        self.path, self.index, self.offset, self.reason = path, index, offset, reason

    def __reduce__(self):
        return type(self), (self.path, self.index, self.offset, self.reason)


@dataclasses.dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float | np.ndarray  # scalar when flag == 0, else float32 vector of length flag
    id: int = 0
    id2: int = 0


def pack(label, payload: bytes, id: int = 0, id2: int = 0) -> bytes:  # noqa: A002  (mxnet's field name)
    """IRHeader + payload bytes; a vector label sets flag = len(label) as mxnet.recordio.pack does."""
    if np.ndim(label) == 0:
        return _IRHEADER.pack(0, float(label), id, id2) + bytes(payload)
    vector = np.asarray(label, dtype="<f4").reshape(-1)
    return _IRHEADER.pack(len(vector), 0.0, id, id2) + vector.tobytes() + bytes(payload)


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Splits a record into its IRHeader and payload; raises ValueError if it is too short."""
    if len(record) < _IRHEADER.size:
        raise ValueError(f"record of {len(record)} bytes is shorter than the {_IRHEADER.size}-byte IRHeader")
    flag, label, id_, id2 = _IRHEADER.unpack_from(record)
    start = _IRHEADER.size
    if flag > 0:
        end = start + 4 * flag
        if end > len(record):
            raise ValueError(f"IRHeader says {flag} float labels but the record has only {len(record)} bytes")
        label = np.frombuffer(record, "<f4", count=flag, offset=start).copy()
        start = end
    return IRHeader(flag, label, id_, id2), record[start:]


def header_label(header: IRHeader) -> int:
    """The class label: label[0] for a vector label, the scalar otherwise (as the original's dataset/record_dataset.py reads it)."""
    return int(header.label[0]) if header.flag > 0 else int(header.label)


def encode_record(data: bytes) -> bytes:
    """Frames `data` as one logical RecordIO record (split at aligned magic words like dmlc-core)."""
    data = bytes(data)
    if len(data) >= _MAX_RECORD:
        raise ValueError(f"record of {len(data)} bytes exceeds the RecordIO limit of {_MAX_RECORD - 1}")
    out, start = [], 0
    aligned = np.frombuffer(data[: len(data) // 4 * 4], "<u4")
    for word in np.flatnonzero(aligned == MAGIC):
        i = int(word) * 4
        out += [_MAGIC_BYTES, struct.pack("<I", ((1 if start == 0 else 2) << 29) | (i - start)), data[start:i]]
        start = i + 4
    tail = len(data) - start
    out += [_MAGIC_BYTES, struct.pack("<I", ((3 if start else 0) << 29) | tail), data[start:],
            b"\0" * (-tail % 4)]
    return b"".join(out)


class RecordIOWriter:
    """Writes a .rec (and .idx when idx_path is given) atomically: each goes to a temp name next to it
    (``adaface_jax.io.atomic_path``; a gs:// target is uploaded once, whole) and is renamed on close(); abort() leaves any earlier files intact."""

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.rec_path, self.idx_path = os.fspath(rec_path), idx_path and os.fspath(idx_path)
        self._files = contextlib.ExitStack()
        self._rec = io.open(self._files.enter_context(io.atomic_path(self.rec_path)), "wb")
        self._idx = io.open(self._files.enter_context(io.atomic_path(self.idx_path)), "w") if self.idx_path else None
        self._offset = 0

    def write(self, data: bytes, key: int | None = None) -> int:
        """Appends one record and returns its byte offset; `key` goes to the .idx."""
        offset = self._offset
        framed = encode_record(data)
        self._rec.write(framed)
        self._offset += len(framed)
        if self._idx is not None:
            if key is None:
                raise ValueError("an indexed RecordIOWriter needs a key for every record")
            self._idx.write(f"{int(key)}\t{offset}\n")
        return offset

    def _close_handles(self):
        for handle in (self._rec, self._idx):
            if handle is not None and not handle.closed:
                handle.close()

    def close(self) -> None:
        self._close_handles()
        self._files.close()  # renames the finished files into place

    def abort(self) -> None:
        self._close_handles()
        self._files.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temp files

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


def read_idx(idx_path: str) -> dict[int, int]:
    """Parses "key<TAB>offset" lines into {key: offset}; raises naming the line on bad input."""
    index = {}
    with io.open(idx_path, "r") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                key, offset = int(parts[0]), int(parts[1])
                if len(parts) != 2 or offset < 0:
                    raise ValueError
            except (ValueError, IndexError):
                raise InputError(f"{idx_path}:{line_no}: expected 'key<TAB>byte offset' (two non-negative "
                                 f"integers), got {line.rstrip()!r}") from None
            index[key] = offset
    return index


class RecordIOReader:
    """Random and sequential access to a .rec; uses the .idx when present, otherwise scans the file."""

    def __init__(self, rec_path: str, idx_path: str | None = None, skip_corrupt: bool = False,
                 offsets: dict[int, int] | None = None):
        """offsets: a known {key: offset} map (skips reading the .idx or scanning)."""
        self.path = os.fspath(rec_path)
        if idx_path is None:
            guess = os.path.splitext(self.path)[0] + ".idx"
            idx_path = guess if io.exists(guess) else None
        self.idx_path = idx_path
        self.file_size = io.getsize(self.path)
        self._files = contextlib.ExitStack()  # io.open of a gs:// path is a context manager, not a file
        self._f = self._files.enter_context(io.open(self.path, "rb"))  # a gs:// .rec is read in place
        self.corrupt: list[tuple[int, int, str]] = []  # (index, offset, reason) met while scanning
        if offsets is not None:
            self.offsets = dict(offsets)
        elif idx_path:
            self.offsets = read_idx(idx_path)
        else:
            self.offsets = dict(self._scan(skip_corrupt))

    def close(self):
        self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def __len__(self):
        return len(self.offsets)

    @property
    def keys(self) -> list[int]:
        return list(self.offsets)

    def _read_at(self, f, offset: int, index: int) -> tuple[bytes, int]:
        """Reads the logical record starting at offset; returns (data, offset of the next record)."""
        parts, pos = [], offset
        while True:
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                raise CorruptRecordError(self.path, index, offset,
                                         f"truncated: {len(head)} header bytes at offset {pos}, file ends at "
                                         f"{self.file_size}")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise CorruptRecordError(self.path, index, offset,
                                         f"bad magic 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x})")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            data = f.read(length)
            if len(data) < length:
                raise CorruptRecordError(self.path, index, offset,
                                         f"truncated: record says {length} bytes at offset {pos + 8}, only "
                                         f"{len(data)} remain")
            parts.append(data)
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts), pos
            if cflag not in (1, 2) or (cflag == 1 and len(parts) > 1):
                raise CorruptRecordError(self.path, index, offset, f"bad continuation flag {cflag} at {pos}")

    def _scan(self, skip_corrupt: bool) -> Iterator[tuple[int, int]]:
        """(position, offset) of all records in order; position is the key (a skipped record keeps its number). A broken record raises, or with skip_corrupt is recorded in
        self.corrupt and reading resumes at the next aligned magic word."""
        with io.open(self.path, "rb") as f:
            pos, index = 0, 0
            while pos < self.file_size:
                try:
                    _, nxt = self._read_at(f, pos, index)
                    yield index, pos
                    pos = nxt
                except CorruptRecordError as err:
                    if not skip_corrupt:
                        raise
                    self.corrupt.append((index, pos, err.reason))
                    pos = self._next_magic(f, pos + 4)
                index += 1

    def _next_magic(self, f, pos: int) -> int:
        pos += -pos % 4
        f.seek(pos)
        blob = f.read()
        words = np.frombuffer(blob[: len(blob) // 4 * 4], "<u4")
        hits = np.flatnonzero(words == MAGIC)
        return pos + 4 * int(hits[0]) if len(hits) else self.file_size

    def read_record(self, offset: int, index: int = -1) -> bytes:
        return self._read_at(self._f, offset, index)[0]

    def read_idx(self, key: int) -> bytes:
        if key not in self.offsets:
            raise KeyError(f"{self.path}: no record with key {key}")
        return self.read_record(self.offsets[key], key)

    def read_image_record(self, key: int) -> tuple[IRHeader, bytes]:
        """(IRHeader, payload) of record `key`; a short or inconsistent header raises CorruptRecordError."""
        offset = self.offsets[key]
        data = self.read_record(offset, key)
        try:
            return unpack(data)
        except ValueError as err:
            raise CorruptRecordError(self.path, key, offset, str(err)) from None

    def image_keys(self) -> list[int]:
        """Keys of the image records (InsightFace's layout): 1 .. label[0]-1 when record 0 is a header with flag > 0."""
        if 0 in self.offsets:
            header, _ = self.read_image_record(0)
            if header.flag > 0:
                last = int(header.label[0])
                return [k for k in range(1, last) if k in self.offsets] if self.idx_path else \
                    [k for k in self.offsets if 1 <= k < last]
        return sorted(self.offsets)


def write_insightface_rec(rec_path: str, idx_path: str | None, items, num_classes: int | None = None,
                          vector_labels: bool = False) -> int:
    """Writes an InsightFace-style .rec: header record 0 (flag 2, label [N+1, N+1+C]) then images 1..N.

    items: iterable of (encoded image bytes, int label). Returns the number of images written.
    """
    items = list(items)
    n = len(items)
    classes = num_classes if num_classes is not None else len({label for _, label in items})
    with RecordIOWriter(rec_path, idx_path) as writer:
        writer.write(pack([float(n + 1), float(n + 1 + classes)], b""), key=0)
        for key, (payload, label) in enumerate(items, 1):
            lab = [float(label), float(key)] if vector_labels else float(label)
            writer.write(pack(lab, payload, id=key), key=key)
    return n
