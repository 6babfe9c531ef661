"""The training input's stream layout, in plain Python (no TensorFlow): which records each logical stream holds,
which streams each process runs, how many steps an epoch has and how many bytes a process reads.

Topology-independent ("elastic") layout. The records (shards in manifest order, concatenated) are split into
S = gcd(num_streams, global_batch_size) logical streams of contiguous record ranges, stream s holding records
[s*N//S, (s+1)*N//S). Each stream reads its range (the pieces of the shards it covers), in an order of pieces
and with a shuffle keyed by (seed, epoch, stream), and supplies R = B/S consecutive rows of every global batch:
global row j of a step is row j mod R of stream j // R. Process p of P runs the contiguous block of streams
[p*S/P, (p+1)*S/P), so its rows are the contiguous block [p*B/P, (p+1)*B/P) of the global batch -- exactly what
``adaface_jax.parallel.host_to_global`` assembles (process rows in process order). The process count must divide
S. Steps per epoch = min over streams of (records in stream) // R, which does not depend on P either.

The trainer plans a run with these (steps per epoch, the data layout a checkpoint records) without loading
TensorFlow; ``data_pipeline.input`` builds the tf.data pipeline on them.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .manifest import read_manifest

__all__ = ["TrainInputConfig", "effective_streams", "stream_layout", "process_streams", "host_assignment",
           "io_amplification", "steps_per_epoch"]


@dataclasses.dataclass
class TrainInputConfig:
    data_dir: str
    global_batch_size: int
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    augment: bool = True
    crop_prob: float = 0.2
    lowres_prob: float = 0.2
    photometric_prob: float = 0.2
    flip_prob: float = 0.5
    shuffle_buffer: int = 16384  # records in all the streams' shuffle buffers together (split evenly)
    num_parallel_calls: int = -1  # tf.data.AUTOTUNE
    image_size: int = 112
    cycle_length: int = 4  # shard pieces each stream reads at once
    prefetch_batches: int = 2
    threads: int | None = None  # size of a private tf.data thread pool (None: TensorFlow's default)
    num_streams: int = 64  # logical input streams (the effective count is gcd(num_streams, global_batch_size))
    # Reads in flight: None = tf.data.AUTOTUNE for a gs:// dataset (each read waits tens of ms on the bucket, so
    # sequential reads would starve the decoders), 0 = sequential (a local disk: parallel reading costs CPU per
    # row and gains nothing there), n > 0 = n. The batches are the same for every setting (deterministic order).
    parallel_reads: int | None = None

    @property
    def local_batch_size(self) -> int:
        if self.global_batch_size % self.process_count:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by "
                             f"process_count {self.process_count}")
        return self.global_batch_size // self.process_count


def effective_streams(num_streams: int, global_batch_size: int) -> int:
    """The number of logical streams: gcd(num_streams, global_batch_size), so each supplies B/S rows a step."""
    if int(num_streams) < 1:
        raise ValueError(f"num_streams={num_streams}: expected a positive integer")
    return math.gcd(int(num_streams), int(global_batch_size))


def stream_layout(manifest: dict, num_streams: int) -> list[list[tuple[int, int, int]]]:
    """For each stream, its pieces (shard id, records to skip in the shard, records to take): stream s holds
    the global records [s*N//S, (s+1)*N//S) of the shards concatenated in manifest order."""
    counts = [int(s["num_images"]) for s in manifest["shards"]]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(starts[-1])
    layout = []
    for s in range(num_streams):
        lo, hi = s * total // num_streams, (s + 1) * total // num_streams
        pieces = []
        for k, count in enumerate(counts):
            a, b = max(lo, int(starts[k])), min(hi, int(starts[k]) + count)
            if a < b:
                pieces.append((k, a - int(starts[k]), b - a))
        layout.append(pieces)
    return layout


def process_streams(num_streams: int, process_index: int, process_count: int) -> range:
    """The contiguous block of streams one process runs; the process count must divide the stream count."""
    if num_streams % process_count:
        raise ValueError(f"num_streams: {process_count} processes do not divide the {num_streams} input streams "
                         f"(gcd of data.num_streams and the global batch); use a process count that divides it")
    per = num_streams // process_count
    return range(process_index * per, (process_index + 1) * per)


def host_assignment(manifest: dict, process_index: int, process_count: int, num_streams: int = 64,
                    global_batch_size: int | None = None) -> tuple[list[int], list[int], int]:
    """(shard ids this process reads, the streams it runs, the records those streams hold)."""
    streams_total = effective_streams(num_streams, global_batch_size) if global_batch_size else num_streams
    layout = stream_layout(manifest, streams_total)
    streams = list(process_streams(streams_total, process_index, process_count))
    shards = sorted({k for s in streams for k, _, _ in layout[s]})
    return shards, streams, sum(t for s in streams for _, _, t in layout[s])


def _piece_buffer(piece_bytes: float) -> int:
    """Read buffer of a piece: its size plus 1/16 (one read when the records are near the shard's mean size),
    within [16 KiB, 1 MiB]. A read fills the whole buffer, so a piece reads at most ceil(size/buffer) buffers."""
    return int(min(1 << 20, max(16 << 10, piece_bytes * 17 // 16)))


def io_amplification(manifest: dict, num_streams: int, global_batch_size: int, process_count: int) -> float:
    """Max over processes of (bytes a process reads per epoch) / (dataset bytes / process_count).

    Each piece starts at its first record's byte offset (found once per run, see
    ``data_pipeline.input.record_offsets``) and reads whole buffers (ceil(piece bytes / buffer) of them, up to the
    end of the shard); bytes are taken proportional to records within a shard (its num_bytes; records count as
    equal without it)."""
    streams_total = effective_streams(num_streams, global_batch_size)
    layout = stream_layout(manifest, streams_total)
    sizes = [float(s.get("num_bytes") or s["num_images"]) / max(1, int(s["num_images"])) for s in manifest["shards"]]
    total = sum(size * int(s["num_images"]) for size, s in zip(sizes, manifest["shards"]))
    worst = 0.0
    for p in range(process_count):
        read = 0.0
        for s in process_streams(streams_total, p, process_count):
            for k, skip, take in layout[s]:
                piece, buffer = sizes[k] * take, _piece_buffer(sizes[k] * take)
                rest = sizes[k] * (int(manifest["shards"][k]["num_images"]) - skip)  # bytes from the offset on
                read += min(rest, math.ceil(piece / buffer) * buffer)
        worst = max(worst, read / (total / process_count))
    return worst


def steps_per_epoch(cfg: TrainInputConfig, manifest: dict | None = None) -> int:
    """min over streams of (records in the stream) // (rows per stream and step); the same for any process count."""
    manifest = manifest or read_manifest(cfg.data_dir)
    streams = effective_streams(cfg.num_streams, cfg.global_batch_size)
    rows = cfg.global_batch_size // streams
    steps = min(sum(t for _, _, t in pieces) for pieces in stream_layout(manifest, streams)) // rows
    if steps <= 0:
        raise ValueError(f"{cfg.data_dir}: {manifest['num_images']} images are too few for a global batch of "
                         f"{cfg.global_batch_size} from {streams} input streams (each needs {rows} images)")
    return steps
