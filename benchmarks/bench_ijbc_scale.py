"""IJB-C-scale scoring on synthetic features with the real sizes: time and peak memory.

469,375 images, 23,124 templates, 15,658,489 pairs (19,557 genuine), 1:N galleries G1 1,772 +
G2 1,759 templates and 19,593 probe templates, 512-d float32 features. Phase 1 writes the meta
files and features into --workdir (not timed); phase 2 runs in a fresh child process (so its
peak RSS is the scoring's own) and times reading the meta files, template pooling, the pair
scores + ROC (1:1) and the 1:N metrics. Printed, not asserted (target < 60 s, < 8 GB).
The 1:1 scores are per-pair ``np.sum(f1 * f2, -1)`` as the reference (exact ties kept), not a
blocked matrix product; the 1:N products score identical rows once (evaluation.ranking).

    python3 benchmarks/bench_ijbc_scale.py [--workdir /tmp/ijbc_bench] [--keep]

--workdir must be new, empty, or one this benchmark made (it holds ``.bench_ijbc_scale``): the benchmark
writes its synthetic IJB-C files there and deletes only those afterwards, never a folder's other files.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402  (run_main)
from adaface_jax.errors import InputError  # noqa: E402

N_IMAGES, N_TEMPLATES, N_PAIRS, N_GENUINE = 469_375, 23_124, 15_658_489, 19_557
N_G1, N_G2, N_PROBES, DIM = 1_772, 1_759, 19_593, 512
MARKER = ".bench_ijbc_scale"  # names a work folder this benchmark made
WRITTEN = ("IJBC", "features.npy", "norms.npy")  # what it writes there


def claim_workdir(workdir: str) -> bool:
    """Make ``workdir`` ours (new, empty, or marked by an earlier run) and return whether it was created; a folder
    holding anything else is refused, so the clean-up can never delete a user's files."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise InputError(f"--workdir {workdir}: exists and is not a folder; expected a new or empty folder")
    created = not os.path.exists(workdir)
    if not created and os.listdir(workdir) and not os.path.isfile(os.path.join(workdir, MARKER)):
        raise InputError(f"--workdir {workdir}: holds files this benchmark did not write; expected a new or empty "
                         "folder (the synthetic IJB-C files are written there, then deleted)")
    os.makedirs(workdir, exist_ok=True)
    open(os.path.join(workdir, MARKER), "w").close()
    return created


def clean_workdir(workdir: str, created: bool) -> None:
    """Delete what this benchmark wrote, and the folder itself if it made it and nothing else is left."""
    for name in WRITTEN + (MARKER,):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
    if created and not os.listdir(workdir):
        os.rmdir(workdir)


def prepare(workdir: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    meta = os.path.join(workdir, "IJBC", "meta")
    os.makedirs(meta, exist_ok=True)
    n_subj = N_G1 + N_G2
    # template k: gallery templates 0..3530 are subject k; probes get a random gallery subject
    subj_of_t = np.r_[np.arange(n_subj), rng.integers(0, n_subj, N_PROBES)]
    tids = np.arange(1, N_TEMPLATES + 1)
    # every template gets >= 1 image; the rest are spread at random
    img_t = np.r_[np.arange(N_TEMPLATES), rng.integers(0, N_TEMPLATES, N_IMAGES - N_TEMPLATES)]
    img_t.sort(kind="stable")
    media = img_t * 16 + rng.integers(0, 4, N_IMAGES)  # several media per template, several images per media
    t0 = time.perf_counter()
    with open(os.path.join(meta, "ijbc_face_tid_mid.txt"), "w") as f:
        f.write("".join(f"{i}.jpg {tids[t]} {m}\n" for i, (t, m) in enumerate(zip(img_t, media))))
    lm = "46.060 62.026 87.785 60.323 68.851 77.656 52.162 99.875 86.450 98.648 0.999"
    with open(os.path.join(meta, "ijbc_name_5pts_score.txt"), "w") as f:
        f.write("".join(f"{i}.jpg {lm}\n" for i in range(N_IMAGES)))
    # pairs: genuine = same subject (a probe template and its gallery template), impostors random
    probes = np.arange(n_subj, N_TEMPLATES)
    gen_p = rng.choice(probes, N_GENUINE, replace=True)
    gen = np.stack([tids[gen_p], tids[subj_of_t[gen_p]], np.ones(N_GENUINE, np.int64)], 1)
    a = rng.integers(0, N_TEMPLATES, 2 * (N_PAIRS - N_GENUINE))
    b = rng.integers(0, N_TEMPLATES, 2 * (N_PAIRS - N_GENUINE))
    keep = subj_of_t[a] != subj_of_t[b]
    a, b = a[keep][:N_PAIRS - N_GENUINE], b[keep][:N_PAIRS - N_GENUINE]
    imp = np.stack([tids[a], tids[b], np.zeros(a.size, np.int64)], 1)
    pairs = np.concatenate([gen, imp])
    pairs = pairs[rng.permutation(pairs.shape[0])]
    np.savetxt(os.path.join(meta, "ijbc_template_pair_label.txt"), pairs, fmt="%d")

    def write_csv(name, templates):
        rows = np.flatnonzero(np.isin(img_t, templates))
        with open(os.path.join(meta, name), "w") as f:
            f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
            f.write("".join(f"{tids[img_t[r]]},{subj_of_t[img_t[r]]},{r}.jpg\n" for r in rows))
    write_csv("ijbc_1N_gallery_G1.csv", np.arange(N_G1))
    write_csv("ijbc_1N_gallery_G2.csv", np.arange(N_G1, n_subj))
    write_csv("ijbc_1N_probe_mixed.csv", probes)
    centroids = rng.standard_normal((n_subj, DIM), dtype=np.float32)
    feats = np.empty((N_IMAGES, DIM), np.float32)
    for s in range(0, N_IMAGES, 50_000):
        e = slice(s, s + 50_000)
        feats[e] = centroids[subj_of_t[img_t[e]]] + 8.0 * rng.standard_normal((feats[e].shape[0], DIM), dtype=np.float32)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    np.save(os.path.join(workdir, "features.npy"), feats / norms)
    np.save(os.path.join(workdir, "norms.npy"), norms * 20.0 / norms.mean())
    print(f"prepared {workdir} in {time.perf_counter() - t0:.1f} s")


def score(workdir: str) -> None:
    from evaluation import ijb  # noqa: PLC0415
    timings = {}
    t_all = t = time.perf_counter()
    meta = ijb.load_meta(workdir, "IJBC")
    timings["read meta files (1:1)"] = time.perf_counter() - t
    t = time.perf_counter()
    feats = np.load(os.path.join(workdir, "features.npy"))
    norms = np.load(os.path.join(workdir, "norms.npy"))
    img_feats = ijb.image_features_for_templates(feats, norms, "pre_norm_vector_add")
    del feats
    timings["load features"] = time.perf_counter() - t
    t = time.perf_counter()
    ver = ijb.verification_11(meta, img_feats)
    timings["1:1 pooling + 15.7M pair scores + ROC"] = time.perf_counter() - t
    t = time.perf_counter()
    ident = ijb.identification_1n(meta, img_feats)
    timings["1:N (read CSVs, pooling, rank, both TPIR@FPIR)"] = time.perf_counter() - t
    total = time.perf_counter() - t_all
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    for k, v in timings.items():
        print(f"  {k:<48s} {v:7.2f} s")
    print(f"  {'total':<48s} {total:7.2f} s   (target < 60 s)")
    print(f"  peak RSS of the scoring process: {peak_gb:.2f} GB (target < 8 GB)")
    print("  TAR@FAR:", {f"{k:g}": round(v * 100, 2) for k, v in ver["tar_at_far"].items()},
          f"pairs {ver['num_pairs']} genuine {ver['num_genuine']}")
    print("  1:N rank:", ident["rank"], "probes", ident["num_probes"], "gallery", ident["num_gallery"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/ijbc_scale_bench")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--phase", choices=("all", "score"), default="all")
    args = parser.parse_args()
    if args.phase == "score":
        score(args.workdir)
        return 0
    created = claim_workdir(args.workdir)
    try:
        if not os.path.exists(os.path.join(args.workdir, "norms.npy")):  # written last
            prepare(args.workdir)
        return subprocess.call([sys.executable, os.path.abspath(__file__), "--phase", "score",
                                "--workdir", args.workdir])
    finally:
        if not args.keep:
            clean_workdir(args.workdir, created)


if __name__ == "__main__":
    harness.run_main(main)
