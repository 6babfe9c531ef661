""".rec -> TFRecord conversion speed: ours (parallel workers, hand-serialised Examples) against a baseline
written the obvious way in the same run (one process, mxnet-style reader loop + tf.train.Example protos).

    python3 benchmarks/bench_rec_convert.py --images 20000 --workers 2

Worker processes are spawned and import TensorFlow (~5-10 s each on a busy 2-core machine), which is why
write_dataset converts in-process below 200k images by default. Prints images/s end to end (including spawning workers, which import TensorFlow) and per core, and the
ratio to the baseline. Target: >= 5000 images/s on 2 cores.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402  (the argparse types and run_main)


def make_rec(path, n):
    from data_pipeline import recordio, synthetic
    # 200 distinct rendered faces, reused (JPEG bytes are copied, so content does not change the speed)
    pool = [synthetic.encode(synthetic.render(0, i % 50, i)[0]) for i in range(200)]
    recordio.write_insightface_rec(path, os.path.splitext(path)[0] + ".idx",
                                   ((pool[i % 200], i // 20) for i in range(n)))
    return np.mean([len(p) for p in pool])


def baseline(rec, out):
    import tensorflow as tf
    from data_pipeline import recordio
    start = time.perf_counter()
    with recordio.RecordIOReader(rec) as reader, tf.io.TFRecordWriter(out) as writer:
        for key in reader.image_keys():
            header, payload = reader.read_image_record(key)
            example = tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[payload])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[recordio.header_label(header)])),
                "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[key]))}))
            writer.write(example.SerializeToString())
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=harness.positive_int, default=20000)
    parser.add_argument("--workers", type=harness.positive_int, default=2)
    args = parser.parse_args()
    from data_pipeline import prepare
    from data_pipeline.manifest import read_manifest
    tmp = tempfile.mkdtemp()
    try:
        rec = os.path.join(tmp, "train.rec")
        size = make_rec(rec, args.images)
        print(f"{args.images} images of {size / 1024:.1f} KiB in {rec}")
        t_base = baseline(rec, os.path.join(tmp, "baseline.tfrecord"))
        start = time.perf_counter()
        manifest = prepare.convert_rec(rec, os.path.join(tmp, "ours"), num_workers=args.workers,
                                       num_shards=max(2 * args.workers, 4), show_progress=False)
        t_ours = time.perf_counter() - start
        assert manifest["num_images"] == args.images
        start = time.perf_counter()
        prepare.convert_rec(rec, os.path.join(tmp, "ours0"), num_workers=0, num_shards=4, show_progress=False)
        t_one = time.perf_counter() - start
        w_one = read_manifest(os.path.join(tmp, "ours0"))["seconds"]
        n = args.images
        rows = [("baseline (1 proc, tf.train.Example)", t_base, 1),
                ("ours, in-process, end to end", t_one, 1),
                (f"ours, {args.workers} workers, end to end", t_ours, args.workers),
                (f"ours, {args.workers} workers, shard writing", manifest["seconds"], args.workers)]
        rows.insert(2, ("ours, in-process, shard writing", w_one, 1))
        print(f"{'variant (end to end includes planning,':<44}")
        print(f"{' worker spawn + TF import, tfds metadata)':<44}{'img/s':>10}{'img/s/core':>12}{'vs baseline':>13}")
        for name, seconds, cores in rows:
            print(f"{name:<44}{n / seconds:>10.0f}{n / seconds / cores:>12.0f}{t_base / seconds:>13.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    harness.run_main(main)
