"""10-fold verification on 6000 pairs: vectorized evaluation.verification vs a loop implementation
of the reference algorithm (per fold, per threshold), in the same run. Printed, not asserted.

    python3 benchmarks/bench_verification.py [--bin ../shared/data/lfw_gray112.bin] [--repeats 5]
Without --bin it uses the LFW .bin of ../shared/data when that exists, otherwise synthetic unit embeddings
(the pair structure is what matters); a --bin that does not exist is an error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402  (the argparse types and run_main)
from evaluation import verification  # noqa: E402


def loop_reference(thresholds, emb1, emb2, issame, nrof_folds=10):
    """The reference calculate_roc: KFold(shuffle=False), threshold loops on train and test splits."""
    n = min(len(issame), emb1.shape[0])
    dist = np.sum(np.square(np.subtract(emb1, emb2)), 1)
    sizes = np.full(nrof_folds, n // nrof_folds)
    sizes[: n % nrof_folds] += 1
    bounds = np.r_[0, np.cumsum(sizes)]
    idx = np.arange(n)
    tprs = np.zeros((nrof_folds, len(thresholds)))
    fprs = np.zeros((nrof_folds, len(thresholds)))
    acc = np.zeros(nrof_folds)
    best = np.zeros(nrof_folds)

    def calc(thr, d, same):
        pred = np.less(d, thr)
        tp = np.sum(np.logical_and(pred, same))
        fp = np.sum(np.logical_and(pred, np.logical_not(same)))
        tn = np.sum(np.logical_and(np.logical_not(pred), np.logical_not(same)))
        fn = np.sum(np.logical_and(np.logical_not(pred), same))
        tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
        fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
        return tpr, fpr, float(tp + tn) / d.size

    for f in range(nrof_folds):
        test = idx[bounds[f]:bounds[f + 1]]
        train = np.setdiff1d(idx, test)
        acc_train = np.array([calc(t, dist[train], issame[train])[2] for t in thresholds])
        bi = int(np.argmax(acc_train))
        best[f] = thresholds[bi]
        for t_i, t in enumerate(thresholds):
            tprs[f, t_i], fprs[f, t_i], _ = calc(t, dist[test], issame[test])
        acc[f] = calc(thresholds[bi], dist[test], issame[test])[2]
    return np.mean(tprs, 0), np.mean(fprs, 0), acc, best


def load_embeddings(bin_path):
    if bin_path is not None:
        import cv2  # noqa: PLC0415
        from data_pipeline.bin_reader import load_bin  # noqa: PLC0415
        imgs, issame = load_bin(bin_path)
        small = np.stack([cv2.resize(cv2.cvtColor(np.asarray(i), cv2.COLOR_BGR2GRAY), (16, 16),
                                     interpolation=cv2.INTER_AREA) for i in imgs]).reshape(len(imgs), -1)
        small = small.astype(np.float32) - small.mean(1, keepdims=True)
        f = small @ np.random.default_rng(1234).normal(size=(256, 64)).astype(np.float32)
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32), np.asarray(issame, bool), bin_path
    rng = np.random.default_rng(0)
    issame = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], 10)
    f = rng.normal(size=(12000, 512)).astype(np.float32)
    f[1::2][issame] = f[0::2][issame] + 0.8 * f[1::2][issame]
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32), issame, "synthetic"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_bin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "lfw_gray112.bin")
    parser.add_argument("--bin", default=None, help="a verification .bin (default: the shared LFW one if present)")
    parser.add_argument("--repeats", type=harness.positive_int, default=5)
    args = parser.parse_args()
    bin_path = args.bin if args.bin is not None else (default_bin if os.path.isfile(default_bin) else None)
    emb, issame, source = load_embeddings(bin_path)
    print(f"data: {source}, {len(issame)} pairs, dim {emb.shape[1]}")
    t0 = time.perf_counter()
    ref = loop_reference(verification.THRESHOLDS, emb[0::2], emb[1::2], issame)
    t_loop = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours = verification.evaluate(emb, issame)
        times.append(time.perf_counter() - t0)
    t_vec = min(times)
    identical = all(np.array_equal(a, b) for a, b in zip(ours, ref))
    print(f"loop reference : {t_loop * 1e3:9.1f} ms")
    print(f"vectorized     : {t_vec * 1e3:9.1f} ms (best of {args.repeats})")
    print(f"speed-up       : {t_loop / t_vec:9.1f}x  (target >= 50x)")
    print(f"identical tpr/fpr/accuracy/thresholds: {identical}")
    print(f"accuracy {ours[2].mean():.4f}  best threshold {ours[3].mean():.4f}")
    return 0 if identical else 1


if __name__ == "__main__":
    harness.run_main(main)
