"""Input pipeline throughput: ours (tf.data) vs a reference PyTorch DataLoader + PIL + OpenCV pipeline doing the
same work (decode JPEG, BGR, the AdaFace augmentations at recipe probabilities, normalise, batch) on the same cores.

    python3 benchmarks/bench_input_pipeline.py --images 2000 --cores 2 --batches 30

Prints images/s, images/s per core and the ratio ours/reference for decode-only and full augmentation.
Targets: >= 2x the reference and >= 1000 images/s/core. Numbers vary with other load on the machine.

Also prints the cost of decoding JPEG exactly as the original (dct_method='INTEGER_ACCURATE', bit-exact with
cv2.imdecode; what data_pipeline.input.decode_any does) against TensorFlow's default fast IDCT, and of the
rebuild of a batch holding an undecodable record (safe_decode; used only for such batches).

And the I/O amplification of the topology-independent stream layout (data_pipeline.input.io_amplification: the
bytes the busiest host reads per epoch relative to its share) for 1, 2, 4 and 8 processes, for this dataset and
for an MS1MV2-sized one (5,822,653 images of ~4.5 KiB in 150 MiB shards, as `adaface-jax prepare` writes them).
"""
import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402  (the argparse types and run_main)


class ReferenceDataset:
    """What the original does per sample (record_dataset.py + Augmenter + transforms), on in-memory JPEG bytes."""

    def __init__(self, encoded, labels, augment):
        self.encoded, self.labels, self.augment = encoded, labels, augment

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, index):
        import cv2
        import torch
        from PIL import Image, ImageEnhance

        bgr = cv2.imdecode(np.frombuffer(self.encoded[index], np.uint8), cv2.IMREAD_COLOR)  # mx decode + swap
        img = Image.fromarray(bgr, "RGB")  # BGR data in a PIL "RGB" image, as the original
        if self.augment:
            if np.random.random() < 0.2:  # crop with zero fill
                i, j, h, w = _torch_crop_params(112, 112)
                arr = np.zeros((112, 112, 3), np.uint8)
                arr[i:i + h, j:j + w] = np.asarray(img)[i:i + h, j:j + w]
                img = Image.fromarray(arr)
            if np.random.random() < 0.2:  # low resolution
                flags = [cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4]
                side = int(np.random.uniform(0.2, 1.0) * 112)
                arr = cv2.resize(np.asarray(img), (side, side), interpolation=np.random.choice(flags))
                img = Image.fromarray(cv2.resize(arr, (112, 112), interpolation=np.random.choice(flags)))
            if np.random.random() < 0.2:  # photometric (ColorJitter 0.5, hue 0)
                order = torch.randperm(4).tolist()
                factors = [float(torch.empty(1).uniform_(0.5, 1.5)) for _ in range(3)]
                enh = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
                for k in order:
                    if k < 3:
                        img = enh[k](img).enhance(factors[k])
            if torch.rand(1) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - 0.5) / 0.5, self.labels[index]


def _torch_crop_params(height, width):
    import torch
    area = height * width
    for _ in range(10):
        target = area * torch.empty(1).uniform_(0.2, 1.0).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3)).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (torch.randint(0, height - h + 1, (1,)).item(), torch.randint(0, width - w + 1, (1,)).item(), h, w)
    return 0, 0, height, width


def time_reference(encoded, labels, augment, cores, batch, batches):
    import torch
    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(ReferenceDataset(encoded, labels, augment), batch_size=batch, shuffle=True,
                                         num_workers=cores, drop_last=True, persistent_workers=True,
                                         prefetch_factor=4)
    it = iter(loader)
    for _ in range(3):
        next(it)
    start = time.perf_counter()
    n = 0
    while n < batches:
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += 1
    return batches * batch / (time.perf_counter() - start)


def time_ours(data_dir, augment, cores, batch, batches):
    from data_pipeline.input import TrainInputConfig, make_train_iterator
    cfg = TrainInputConfig(data_dir=data_dir, global_batch_size=batch, seed=0, augment=augment,
                           num_parallel_calls=cores, threads=cores, shuffle_buffer=2048)
    it = make_train_iterator(cfg)
    for _ in range(3):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def time_jpeg_decode(encoded, batch, batches):
    """images/s of a per-batch map_fn decode, (fast IDCT, INTEGER_ACCURATE, decode_any with its format test)."""
    import tensorflow as tf

    from data_pipeline.input import decode_any
    data = tf.constant(encoded[:batch])

    def timed(fn):
        f = tf.function(lambda x: tf.map_fn(fn, x, fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8)))
        f(data)
        start = time.perf_counter()
        for _ in range(batches):
            f(data)
        return batches * batch / (time.perf_counter() - start)

    fast = timed(lambda e: tf.io.decode_jpeg(e, channels=3))
    accurate = timed(lambda e: tf.io.decode_jpeg(e, channels=3, dct_method="INTEGER_ACCURATE"))
    ours = timed(decode_any)
    return fast, accurate, ours


def time_safe_batches(data_dir, cores, batch, batches):
    """images/s of whole batches through the safe (bad-record tolerant) decode path."""
    import tensorflow as tf

    from data_pipeline.input import TrainInputConfig, make_train_dataset
    cfg = TrainInputConfig(data_dir=data_dir, global_batch_size=batch, seed=0, augment=False,
                           num_parallel_calls=cores, threads=cores, shuffle_buffer=2048)
    result = []
    for safe in (False, True):
        it = make_train_dataset(cfg, safe_decode=safe).as_numpy_iterator()
        for _ in range(3):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        result.append(batches * batch / (time.perf_counter() - start))
    del tf
    return result


def print_io_amplification(manifest, num_streams, batch):
    from data_pipeline.input import effective_streams, io_amplification
    n, record = 5_822_653, 4500
    per_shard = (150 << 20) // record
    counts = [per_shard] * (n // per_shard) + ([n % per_shard] if n % per_shard else [])
    ms1m = {"num_images": n, "shards": [{"num_images": c, "num_bytes": c * record} for c in counts]}
    for name, m, b in ((f"this dataset, batch {batch}", manifest, batch), ("MS1MV2-sized, batch 512", ms1m, 512)):
        amp = ", ".join(f"P={p}: {io_amplification(m, num_streams, b, p):.3f}x" for p in (1, 2, 4, 8))
        print(f"I/O amplification ({name}, {len(m['shards'])} shards, {effective_streams(num_streams, b)} streams): "
              f"{amp}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=harness.positive_int, default=2000)
    parser.add_argument("--cores", type=harness.positive_int, default=2)
    parser.add_argument("--batch", type=harness.positive_int, default=128)
    parser.add_argument("--batches", type=harness.positive_int, default=30)
    parser.add_argument("--data-dir", default=None, help="an existing dataset dir (default: synthesize one)")
    parser.add_argument("--num-streams", type=harness.positive_int, default=64, help="data.num_streams")
    args = parser.parse_args()
    from data_pipeline import synthetic

    if args.data_dir is not None:
        return measure(args, args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "syn")
        ids = max(2, args.images // 20)
        synthetic.write_synthetic_dataset(data_dir, ids, max(1, args.images // ids), seed=0, show_progress=False)
        return measure(args, data_dir)


def measure(args, data_dir):
    import tensorflow as tf

    from data_pipeline.manifest import read_manifest, shard_paths

    encoded, labels = [], []
    for record in tf.data.TFRecordDataset(shard_paths(data_dir, read_manifest(data_dir))):
        f = tf.train.Example.FromString(record.numpy()).features.feature
        encoded.append(f["image"].bytes_list.value[0])
        labels.append(f["label"].int64_list.value[0])
    print(f"{len(encoded)} JPEG images of {np.mean([len(e) for e in encoded]) / 1024:.1f} KiB, cores={args.cores}, "
          f"batch={args.batch}, batches={args.batches}")
    print(f"{'mode':<14}{'ours img/s':>12}{'ours /core':>12}{'ref img/s':>12}{'ref /core':>12}{'ratio':>8}")
    print_io_amplification(read_manifest(data_dir), args.num_streams, args.batch)
    fast, accurate, ours = time_jpeg_decode(encoded, args.batch, args.batches)
    print(f"JPEG decode (one thread, map_fn over a batch): fast IDCT {fast:.0f} img/s, INTEGER_ACCURATE "
          f"{accurate:.0f} img/s (cost x{fast / accurate:.2f}), decode_any {ours:.0f} img/s (x{fast / ours:.2f})")
    normal, safe = time_safe_batches(data_dir, args.cores, args.batch, args.batches)
    print(f"batch decode path: normal {normal:.0f} img/s, safe (bad-record rebuild) {safe:.0f} img/s "
          f"(x{normal / safe:.2f}; used only for a batch that failed)")
    for name, augment in (("decode-only", False), ("full-augment", True)):
        ours = time_ours(data_dir, augment, args.cores, args.batch, args.batches)
        ref = time_reference(encoded, labels, augment, args.cores, args.batch, args.batches)
        print(f"{name:<14}{ours:>12.0f}{ours / args.cores:>12.0f}{ref:>12.0f}{ref / args.cores:>12.0f}"
              f"{ours / ref:>8.2f}")


if __name__ == "__main__":
    harness.run_main(main)
