"""``adaface-jax evaluate``: run a protocol from a checkpoint or score precomputed features.

    adaface-jax evaluate --checkpoint DIR --protocol hq|ijbb|ijbc|ijbs|tinyface --data ROOT [--out DIR]
    adaface-jax evaluate --features FILE.npz --protocol ... --data ROOT

Features file (.npz, no pickles; written by ``--save-features``, or by any model):
  * hq: ``names`` (S,) str, and per set ``features_<name>`` (2N, D) float32 (fused, unit-norm),
    ``norms_<name>`` (2N, 1) and ``issame_<name>`` (N,) bool. --data / --bin are not needed.
  * ijbb / ijbc / tinyface / ijbs: ``features`` (N, D) and ``norms`` (N, 1) in the protocol's image
    order (IJB: meta-file line order; TinyFace: sorted aligned paths; IJB-S: the image list order),
    ``fusion`` (0-d str; IJB multiplies the feature by the norm for pre_norm_vector_add) and
    ``flip_test`` (0-d bool). IJB-S expects ``flip_test`` False (the raw feature is features*norms).
Outputs under ``--out`` (default ``results/<protocol>/<name>``): ``results.json``, the reference
CSVs and ROC/CMC PNGs. The checkpoint is loaded with ``adaface_jax.inference.load_pretrained``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import os
import sys

import numpy as np

from evaluation import ijb, ijbs, plots, tinyface, verification

HQ_SETS = ("agedb_30", "cfp_fp", "lfw", "cplfw", "calfw")
PROTOCOLS = ("hq", "ijbb", "ijbc", "ijbs", "tinyface")
FUSIONS = ("pre_norm_vector_add", "norm_weighted_avg", "average", "concat")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 2)[2]  # the features-file format and the outputs
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="converted checkpoint dir or a released .ckpt")
    src.add_argument("--features", help="precomputed features .npz (format in the module docstring)")
    parser.add_argument("--data", help="dataset root (hq: folder of *.bin; ijbb/ijbc: folder holding IJBB/ or "
                                       "IJBC/; tinyface: folder holding aligned_pad_0.1_pad_high/; ijbs: image root)")
    parser.add_argument("--bin", action="append", default=[], help="hq: an explicit .bin file (repeatable)")
    parser.add_argument("--out", help="output folder (default results/<protocol>/<name>)")
    parser.add_argument("--name", help="model name in the result tables (default: checkpoint/features stem)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--fusion", default="pre_norm_vector_add", choices=FUSIONS)
    parser.add_argument("--no-flip", action="store_true", help="disable the flip test (IJB-S never flips)")
    parser.add_argument("--cache-dir", help="cache features (and decoded .bin images) here")
    parser.add_argument("--save-features", help="also write the extracted features to this .npz")
    parser.add_argument("--tie", default="stable", choices=("stable", "reversed"),
                        help="rank tie order: stable (lower gallery index first) or reversed "
                             "(argsort(score)[::-1] as the reference's TinyFace/IJB-S code)")
    parser.add_argument("--nrof-folds", type=int, default=10)
    parser.add_argument("--ijbs-image-list", help="IJB-S image list CSV (default <data>/image_list_mtcnn_fail_skipped_v1.csv)")
    parser.add_argument("--ijbs-protocol", help="folder of the CS6 protocol CSVs (default <data>/protocol)")
    parser.add_argument("--tinyface-on-collision", default="error", choices=("error", "last"),
                        help="TinyFace file-stem collision: error, or keep the last file (reference)")
    parser.add_argument("--unknown-templates", default="error", choices=("error", "row0"),
                        help="IJB 1:1 pair with an unknown template id: error, or use row 0 (reference)")


# ---------------------------------------------------------------------------------------------- io


def _atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_csv(path, header, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return None  # curves are plotted, not dumped
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def load_features_npz(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"features file not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _require(d, key, path):
    if key not in d:
        raise KeyError(f"{path}: missing array {key!r} (see `adaface-jax evaluate --help`)")
    return d[key]


# ------------------------------------------------------------------------------------------ models


class _Extractor:
    """Lazily loads the checkpoint and embeds images through adaface_jax.features."""

    def __init__(self, args):
        self.args = args
        self._model = None

    def model(self):
        if self._model is None:
            from adaface_jax.inference import load_pretrained  # noqa: PLC0415
            self._model = load_pretrained(self.args.checkpoint)
        return self._model

    def __call__(self, images, key, flip_test, num_images=None):
        from adaface_jax.features import extract_features  # noqa: PLC0415
        m = self.model()
        cache_key = None
        if self.args.cache_dir:  # checkpoint identity: name + hash of its absolute path and mtime
            ckpt = os.path.abspath(self.args.checkpoint)
            stamp = os.path.getmtime(ckpt) if os.path.exists(ckpt) else 0.0
            digest = hashlib.sha1(f"{ckpt}|{stamp}|{self.args.no_flip}".encode()).hexdigest()[:10]
            cache_key = f"{os.path.basename(os.path.normpath(ckpt))}-{digest}-{key}"
        return extract_features(m.module, m.variables, images, batch_size=self.args.batch_size,
                                flip_test=flip_test, fusion=self.args.fusion, cache_dir=self.args.cache_dir,
                                cache_key=cache_key, num_images=num_images, desc=key)


def _imread_bgr(paths):
    import cv2  # noqa: PLC0415
    for p in paths:
        img = cv2.imread(p, cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"cannot read image {p}")
        yield img[None]


# --------------------------------------------------------------------------------------- protocols


def run_hq(args, out_dir, name):
    if args.features:
        z = load_features_npz(args.features)
        sets = [str(s) for s in _require(z, "names", args.features)]
        data = {s: (_require(z, f"features_{s}", args.features), _require(z, f"issame_{s}", args.features))
                for s in sets}
    else:
        bins = list(args.bin)
        if args.data:
            found = [os.path.join(args.data, f"{s}.bin") for s in HQ_SETS]
            bins += [p for p in found if os.path.isfile(p)]
            if not bins:
                bins += sorted(glob.glob(os.path.join(args.data, "*.bin")))
        if not bins:
            raise FileNotFoundError(f"no .bin files: give --bin PATH or --data with {'/'.join(HQ_SETS)}.bin")
        from data_pipeline.bin_reader import load_bin  # noqa: PLC0415
        extract = _Extractor(args)
        data, saved = {}, {}
        for path in bins:
            s = os.path.splitext(os.path.basename(path))[0]
            images, issame = load_bin(path, cache_dir=args.cache_dir)
            feats, norms = extract(images, s, flip_test=not args.no_flip)
            data[s] = (feats, issame)
            saved.update({f"features_{s}": feats, f"norms_{s}": norms, f"issame_{s}": np.asarray(issame, bool)})
        if args.save_features:
            from adaface_jax.features import save_npz_atomic  # noqa: PLC0415
            save_npz_atomic(args.save_features, names=np.array(list(data)), **saved)
    rows, results, curves = [], {}, {}
    for s, (feats, issame) in data.items():
        res = verification.summarize(s, np.asarray(feats), np.asarray(issame, bool), args.nrof_folds)
        curves[s] = res.pop("roc")
        results[s] = res
        rows.append([s, f"{res['accuracy']:.4f}", f"{res['accuracy_std']:.4f}", f"{res['best_threshold']:.4f}",
                     f"{res['tar@far=1e-3']:.4f}", res["num_samples"]])
    mean_acc = float(np.mean([r["accuracy"] for r in results.values()]))
    header = ["set", "accuracy", "std", "best_threshold", "tar@far=1e-3 (extra)", "num_images"]
    _write_csv(os.path.join(out_dir, "hq_result.csv"), header, rows + [["mean", f"{mean_acc:.4f}", "", "", "", ""]])
    plots.plot_roc(curves, os.path.join(out_dir, "hq_roc.png"), title=f"{name}: HQ sets (10-fold mean)", log_x=False)
    _print_table(header, rows + [["mean", f"{mean_acc:.4f}", "", "", "", ""]])
    return {"sets": results, "mean_accuracy": mean_acc}


def _features_for(args, key, image_iter_fn, num_images, flip_test):
    """(features, norms, fusion) from --features or by embedding the images."""
    if args.features:
        z = load_features_npz(args.features)
        feats = _require(z, "features", args.features)
        norms = z.get("norms")
        fusion = str(z["fusion"]) if "fusion" in z else args.fusion
        if feats.shape[0] != num_images:
            raise ValueError(f"{args.features}: {feats.shape[0]} feature rows but the protocol has {num_images} images")
        return feats, norms, fusion
    feats, norms = _Extractor(args)(image_iter_fn(), key, flip_test=flip_test, num_images=num_images)
    if args.save_features:
        from adaface_jax.features import save_npz_atomic  # noqa: PLC0415
        save_npz_atomic(args.save_features, features=feats, norms=norms, fusion=np.array(args.fusion),
                        flip_test=np.array(flip_test))
    return feats, norms, args.fusion


def run_ijb(args, out_dir, name, ds):
    if not args.data:
        raise ValueError("--data ROOT (the folder holding IJBB/ or IJBC/) is required")
    meta = ijb.load_meta(args.data, ds, unknown=args.unknown_templates)
    feats, norms, fusion = _features_for(args, ds.lower(), lambda: (x[None] for x in ijb.iter_aligned_images(meta)),
                                         meta.num_images, flip_test=not args.no_flip)
    img_feats = ijb.image_features_for_templates(feats, norms, fusion)
    ver = ijb.verification_11(meta, img_feats, unknown=args.unknown_templates)
    fpr, tpr = ver.pop("fpr"), ver.pop("tpr")
    fars = list(ver["tar_at_far"])
    _write_csv(os.path.join(out_dir, "verification_result.csv"), ["Methods"] + [str(f) for f in fars],
               [[f"{name}-{ds}"] + [f"{ver['tar_at_far'][f] * 100:.2f}" for f in fars]])
    plots.plot_roc({f"{name}-{ds}": (fpr, tpr, ver["auc"])}, os.path.join(out_dir, "verification_roc.png"),
                   title=f"{ds} 1:1 ROC")
    _print_table(["FAR"] + [f"{f:g}" for f in fars], [["TAR %"] + [f"{ver['tar_at_far'][f] * 100:.2f}" for f in fars]])
    out = {"verification": ver}
    if all(os.path.isfile(meta.files[k]) for k in ("gallery1", "gallery2", "probe")):
        ident = ijb.identification_1n(meta, img_feats, tie=args.tie)
        r = ident["rank"]
        _write_csv(os.path.join(out_dir, "identification_result.csv"), ["", "top1", "top5", "top10"],
                   [["identification", r[1], r[5], r[10]]])
        _print_table(["1:N (G1+G2 merged)", "rank1", "rank5", "rank10"],
                     [["closed set", f"{r[1]:.4f}", f"{r[5]:.4f}", f"{r[10]:.4f}"]])
        std = ident["standard_tpir_at_fpir_mean"]
        pooled = ident["reference_pooled_tpir_at_fpir"]
        _print_table(["TPIR@FPIR", *(f"{f:g}" for f in std)],
                     [["standard, per-gallery mean", *(f"{v:.4f}" for v in std.values())],
                      ["reference pooled (non-standard)", *(f"{v:.4f}" for v in pooled.values())]])
        out["identification"] = ident
    else:
        print(f"{ds}: 1:N CSV files not found; skipped identification", file=sys.stderr)
    return out


def run_tinyface(args, out_dir, name):
    if not args.data:
        raise ValueError("--data ROOT (holding aligned_pad_0.1_pad_high/) is required")
    proto = tinyface.build_protocol(args.data, on_collision=args.tinyface_on_collision)
    feats, _, _ = _features_for(args, "tinyface", lambda: _imread_bgr(proto.image_paths), len(proto.image_paths),
                                flip_test=not args.no_flip)
    res = tinyface.evaluate(feats, proto, tie=args.tie)
    _write_csv(os.path.join(out_dir, "result.csv"), ["rank", "values"], [[k, v] for k, v in res.items()])
    plots.plot_cmc({name: res}, os.path.join(out_dir, "cmc.png"), title="TinyFace")
    _print_table(["TinyFace", *(f"rank{k}" for k in res)], [[name, *(f"{v:.4f}" for v in res.values())]])
    return {"rank": res}


def run_ijbs(args, out_dir, name):
    if not args.data:
        raise ValueError("--data ROOT (the IJB-S image root) is required")
    list_path = args.ijbs_image_list or os.path.join(args.data, "image_list_mtcnn_fail_skipped_v1.csv")
    proto_dir = args.ijbs_protocol or os.path.join(args.data, "protocol")
    paths = ijbs.read_image_list(list_path)
    proto = ijbs.build_protocol(proto_dir)
    feats, norms, _ = _features_for(args, "ijbs", lambda: _imread_bgr(os.path.join(args.data, p) for p in paths),
                                    len(paths), flip_test=False)
    if norms is None:
        raise KeyError(f"{args.features}: IJB-S needs 'norms' (raw feature = features * norms)")
    raw = np.asarray(feats, np.float32) * np.asarray(norms, np.float32).reshape(-1, 1)
    res = ijbs.evaluate(proto, paths, raw, tie=args.tie)
    rows = []
    lines = []
    for proto_name, r in res.items():
        rk, op = r["rank"], r["tpir_at_fpir"]
        rows.append([proto_name, *(f"{v:.4f}" for v in rk.values()), *(f"{v:.4f}" for v in op.values())])
        lines += [f"{proto_name},rank1,rank5,rank10", "closedset," + ",".join(str(v) for v in rk.values()),
                  f"{proto_name},0.01_FPIR,0.1_FPIR", "openset," + ",".join(str(v) for v in op.values())]
    _atomic_write_text(os.path.join(out_dir, "pre_norm_vector_add_cos_result.csv"), "\n".join(lines) + "\n")
    _print_table(["IJB-S", "rank1", "rank5", "rank10", "TPIR@1%", "TPIR@10%"], rows)
    return res


def _print_table(header, rows):
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols if i < len(r)) for i in range(len(header))]
    for j, r in enumerate(cols):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def run(args) -> int:
    source = args.checkpoint or args.features
    name = args.name or os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    out_dir = args.out or os.path.join("results", args.protocol, name)
    os.makedirs(out_dir, exist_ok=True)
    if args.protocol == "hq":
        results = run_hq(args, out_dir, name)
    elif args.protocol in ("ijbb", "ijbc"):
        results = run_ijb(args, out_dir, name, args.protocol.upper())
    elif args.protocol == "tinyface":
        results = run_tinyface(args, out_dir, name)
    else:
        results = run_ijbs(args, out_dir, name)
    summary = {"protocol": args.protocol, "name": name, "source": source, "fusion": args.fusion,
               "flip_test": not args.no_flip, "tie": args.tie, "results": _jsonable(results)}
    _atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(summary, indent=2, allow_nan=True))
    print(f"results written to {out_dir}")
    return 0
