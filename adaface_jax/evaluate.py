"""Run an evaluation protocol on a model or on precomputed features: load the model, embed the protocol's images
(through the feature cache), score them with ``evaluation`` and write the results atomically.
``run_evaluation(EvaluationRequest(...))`` is what ``adaface-jax evaluate`` runs; its fields are the command's
options, and the one-line errors name them by their flags. The ``evaluation`` package receives arrays and never
runs a model: the embedding happens here.

Features file (.npz, no pickles; written by ``--save-features``, or by any model):
  * hq: ``names`` (S,) str, and per set ``features_<name>`` (2N, D) float32 (fused, unit-norm),
    ``norms_<name>`` (2N, 1) and ``issame_<name>`` (N,) bool. --data / --bin are not needed.
  * ijbb / ijbc / tinyface / ijbs: ``features`` (N, D) and ``norms`` (N, 1) in the protocol's image
    order (IJB: meta-file line order; TinyFace: sorted aligned paths; IJB-S: the image list order),
    ``fusion`` (0-d str; IJB multiplies the feature by the norm for pre_norm_vector_add) and
    ``flip_test`` (0-d bool). IJB-S expects ``flip_test`` False (the raw feature is features*norms).
Outputs under ``--out`` (default ``results/<protocol>/<name>``): ``results.json``, the reference
CSVs and ROC/CMC PNGs; they are written to a local staging folder and copied in only when the run
succeeds, ``results.json`` last (an earlier one is removed first), so a folder with a results.json is a
finished run. An existing non-empty --out that is not an earlier evaluate output is refused when the
run would overwrite a file in it. The checkpoint is loaded with ``adaface_jax.inference.load_pretrained``.
Every path (--checkpoint, --features, --bin, --data, --out, --cache-dir, --save-features and the protocol
folders) may be local or a ``gs://`` URL.
IJB-B/C identification (--identification): "auto" runs it when the three 1:N files are in the meta folder,
skips it with a note naming the expected files when none is (results.json records the skip and the
files), and refuses a meta folder with some but not all of them; "require" needs them; "skip" scores 1:1
only.
NaN feature rows (failed photos) are an error unless ``--drop-nan`` leaves them out (counts in
the output and results.json). ``--cache-dir`` caches features under a key made of the weights'
content hash, the source files (a .bin's content hash; for image folders each file's size and
mtime, plus the meta files' content), flip, fusion, compute dtype and backend; a hit is verified
against the key stored in the cache file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from typing import Optional

import numpy as np

from adaface_jax import io
from adaface_jax.align import iter_warped_crops, read_bgr
from adaface_jax.errors import InputError
from adaface_jax.io import save_npz, write_bytes, write_csv, write_text
from evaluation import FUSION_METHODS, ProtocolError, ijb, ijbs, plots, tinyface
from evaluation.evaluators import (IDENTIFICATION, IJBEvaluator, IJBSEvaluator, TinyFaceEvaluator,
                                   VerificationEvaluator, feature_matrix)
from evaluation.verification import HQ_SETS

PROTOCOLS = ("hq", "ijbb", "ijbc", "ijbs", "tinyface")
TIE_ORDERS = ("stable", "reversed")
RESULTS = "results.json"
# The files each protocol writes under --out (besides results.json)
OUTPUT_FILES = {
    "hq": ("hq_result.csv", "hq_roc.png"),
    "ijbb": ("verification_result.csv", "verification_roc.png", "identification_result.csv"),
    "ijbc": ("verification_result.csv", "verification_roc.png", "identification_result.csv"),
    "tinyface": ("result.csv", "cmc.png"),
    "ijbs": ("pre_norm_vector_add_cos_result.csv",),
}
ALL_OUTPUT_FILES = sorted({f for names in OUTPUT_FILES.values() for f in names} | {RESULTS})


@dataclasses.dataclass(frozen=True)
class EvaluationRequest:
    """One evaluation: ``protocol`` on the model at ``checkpoint`` or on the ``features`` file (exactly one).
    Each field is the ``adaface-jax evaluate`` option of the same name (``bins``: ``--bin``; ``flip_test``:
    the opposite of ``--no-flip``); the command's ``--help`` describes them."""

    protocol: str
    checkpoint: Optional[str] = None
    features: Optional[str] = None
    data: Optional[str] = None
    bins: tuple = ()
    out: Optional[str] = None
    name: Optional[str] = None
    batch_size: int = 128
    fusion: str = "pre_norm_vector_add"
    flip_test: bool = True
    cache_dir: Optional[str] = None
    save_features: Optional[str] = None
    tie: str = "stable"
    nrof_folds: int = 10
    ijbs_image_list: Optional[str] = None
    ijbs_protocol: Optional[str] = None
    tinyface_on_collision: str = "error"
    unknown_templates: str = "error"
    tinyface_protocol: Optional[str] = None
    identification: Optional[str] = None
    drop_nan: bool = False


# ---------------------------------------------------------------------------------------------- io


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


def _earlier_results(path: str) -> bool:
    """Whether ``path`` is the results.json of an earlier ``evaluate`` run."""
    try:
        data = json.loads(io.read_text(path))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "protocol" in data and "results" in data


class _Output:
    """The output folder (local or ``gs://``), checked up front; nothing is created in it before
    ``commit``. Files are written to a local staging folder; ``commit`` (after the whole run succeeded)
    removes an earlier results.json, copies the new files in with results.json last, and removes the
    files of an earlier run that this run did not write; ``abort`` drops the staging folder."""

    def __init__(self, out_dir, protocol):
        out_dir = io.check_path(out_dir, "--out")
        if io.exists(out_dir) and not io.isdir(out_dir):
            raise InputError(f"--out {out_dir}: exists and is not a folder")
        self.out_dir = io.check_creatable_dir(out_dir, "--out")
        self.earlier = False
        if io.isdir(out_dir):
            present = [n for n in ALL_OUTPUT_FILES if io.exists(io.join(out_dir, n))]
            self.earlier = _earlier_results(io.join(out_dir, RESULTS))
            clash = [n for n in OUTPUT_FILES[protocol] + (RESULTS,) if n in present]
            if clash and not self.earlier:
                raise InputError(f"--out {out_dir}: holds {clash[0]} but is not the folder of an earlier `adaface-jax "
                                 f"evaluate` run (no {RESULTS} of one); refusing to overwrite it (choose another "
                                 "folder or remove it)")
        self.staging = tempfile.mkdtemp(prefix="adaface-evaluate-")

    def path(self, name: str) -> str:
        """Where a run writes its output ``name`` (in the local staging folder)."""
        return os.path.join(self.staging, name)

    def commit(self):
        written = set(os.listdir(self.staging))
        if self.earlier:  # no longer a finished run while the new files are copied in
            io.remove(io.join(self.out_dir, RESULTS))
            for name in ALL_OUTPUT_FILES:
                if name not in written:
                    io.remove(io.join(self.out_dir, name))
        io.publish_dir(self.staging, self.out_dir, last=(RESULTS,))
        shutil.rmtree(self.staging, ignore_errors=True)

    def abort(self):
        shutil.rmtree(self.staging, ignore_errors=True)


def load_features_npz(path: str) -> dict:
    if not io.isfile(path):
        raise InputError(f"features file not found: {path}")
    try:
        z = np.load(io.readable(path), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ProtocolError(f"{path}: not a readable .npz features file ({e}); expected np.savez output "
                            "(see `adaface-jax evaluate --help`)") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ProtocolError(f"{path}: a single .npy array, not an .npz archive of named arrays "
                            "(see `adaface-jax evaluate --help`)")
    try:
        with z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ProtocolError(f"{path}: cannot read its arrays ({e}); expected plain numeric/string arrays") from None


def _require(d, key, path):
    if key not in d:
        raise ProtocolError(f"{path}: missing array {key!r}; it has {sorted(d)} (see `adaface-jax evaluate --help`)")
    return d[key]


def _norm_column(arr, where, rows):
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu" or arr.size != rows or arr.ndim not in (1, 2):
        raise ProtocolError(f"{where}: expected numeric norms (N, 1) with N = {rows}, got dtype {arr.dtype} "
                            f"shape {arr.shape}")
    return arr.reshape(-1, 1)


def _report_dropped(info):
    if info:
        print("left out (--drop-nan): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in info.items()))


# ------------------------------------------------------------------------------------------ models


def _weights_digest(variables) -> str:
    """sha256 of every variable's path, dtype, shape and bytes: the weights' content."""
    import jax  # noqa: PLC0415
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def files_digest(paths, content: bool) -> str:
    """Fingerprint of source files (local or ``gs://``): size + sha256 of the bytes (``content``), or,
    for folders of many images, path + size + modification time of each file (no re-read of every
    image)."""
    h = hashlib.sha256()
    for p in paths:
        size, mtime_ns = io.file_info(p)
        if content:
            h.update(f"{size}|".encode())
            with io.open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(f"{p}|{size}|{mtime_ns}\n".encode())
    return h.hexdigest()


class _Extractor:
    """Lazily loads the checkpoint and embeds images through adaface_jax.features.

    With ``--cache-dir`` the cache key is what determines the features: the loaded weights'
    content hash, the source files' fingerprint, flip, fusion, the module's compute dtype and the
    JAX backend; ``extract_features`` stores the key and compares it on a hit."""

    def __init__(self, request):
        self.request = request
        self._model = None
        self._weights = None

    def model(self):
        if self._model is None:
            from adaface_jax.inference import load_pretrained  # noqa: PLC0415
            self._model = load_pretrained(self.request.checkpoint)
        return self._model

    def cache_key(self, key, flip_test, sources_digest):
        import jax  # noqa: PLC0415
        m = self.model()
        if self._weights is None:
            self._weights = _weights_digest(m.variables)
        stem = io.basename(self.request.checkpoint)
        return (f"{stem}-{key}|weights={self._weights}|images={sources_digest}|flip={int(flip_test)}"
                f"|fusion={self.request.fusion}|module={type(m.module).__name__}"
                f"|dtype={getattr(m.module, 'dtype', None)}|backend={jax.default_backend()}")

    def __call__(self, images, key, flip_test, sources_digest, num_images=None):
        from adaface_jax.features import extract_features  # noqa: PLC0415
        m = self.model()
        cache_key = self.cache_key(key, flip_test, sources_digest) if self.request.cache_dir else None
        return extract_features(m.module, m.variables, images, batch_size=self.request.batch_size,
                                flip_test=flip_test, fusion=self.request.fusion, cache_dir=self.request.cache_dir,
                                cache_key=cache_key, num_images=num_images, desc=key)


def _imread_bgr(paths):
    for p in paths:
        img = read_bgr(p)
        if img is None:
            raise InputError(f"cannot read image {p}")
        yield img[None]


def _check_images_exist(paths, what):
    """Every image is there (in a bucket: one listing per folder, not one request per image)."""
    listed = {}

    def there(p):
        if not io.is_remote(p):
            return io.isfile(p)
        folder = io.dirname(p)
        if folder not in listed:
            listed[folder] = set(io.listdir(folder)) if io.isdir(folder) else set()
        return io.basename(p) in listed[folder]

    missing = [p for p in paths if not there(p)]
    if missing:
        raise InputError(f"{len(missing)} {what} image(s) missing, e.g. {missing[0]}")


# --------------------------------------------------------------------------------------- protocols


def _hq_bins(req):
    bins = list(req.bins)
    for p in bins:
        if not io.isfile(p):
            raise InputError(f"--bin {p}: no such file")
    if req.data:
        if not io.isdir(req.data):
            raise InputError(f"--data {req.data}: not a folder")
        found = [p for p in (io.join(req.data, f"{s}.bin") for s in HQ_SETS) if io.isfile(p)]
        found = found or [p for p in io.glob(req.data, "*.bin") if io.isfile(p)]
        if not found:
            raise InputError(f"--data {req.data}: no .bin file in this folder; expected {'/'.join(HQ_SETS)}.bin "
                             "(or give --bin PATH)")
        bins += found
    if not bins:
        raise InputError(f"no .bin files: give --bin PATH or --data with {'/'.join(HQ_SETS)}.bin")
    names = [_stem(p) for p in bins]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"two .bin files named {dup[0]!r}: {[p for p, n in zip(bins, names) if n == dup[0]]}")
    return bins


def _stem(path: str) -> str:
    """A path's last name without its extension."""
    name = io.basename(path)
    return name[:name.rfind(".")] if name.rfind(".") > 0 else name


def _load_bin(path: str, cache_dir):
    """A .bin (local or ``gs://``), its decoded images cached in ``cache_dir`` (local or ``gs://``) when given."""
    from data_pipeline.bin_reader import load_bin  # noqa: PLC0415
    return load_bin(path, cache_dir=cache_dir)


def _run_hq(req, output, name):
    if req.features:
        z = load_features_npz(req.features)
        names = [str(s) for s in np.asarray(_require(z, "names", req.features)).reshape(-1)]
        raw = {s: (_require(z, f"features_{s}", req.features), _require(z, f"issame_{s}", req.features))
               for s in names}
        evaluator = VerificationEvaluator({s: (None, i) for s, (_, i) in raw.items()}, nrof_folds=req.nrof_folds,
                                          drop_nan=req.drop_nan)
        metrics = evaluator.score({s: (f, None) for s, (f, _) in raw.items()},
                                  where={s: f"{req.features}: features_{s}" for s in names})
    else:
        loaded = {}
        for path in _hq_bins(req):  # every .bin exists and parses before the model is loaded
            images, issame = _load_bin(path, req.cache_dir)
            loaded[_stem(path)] = (path, images, issame)
        evaluator = VerificationEvaluator({s: (images, issame) for s, (_, images, issame) in loaded.items()},
                                          nrof_folds=req.nrof_folds, drop_nan=req.drop_nan)
        extract = _Extractor(req)
        saved = {}

        def embed_fn(s):
            path, images, issame = loaded[s]
            feats, norms = extract(images, s, flip_test=req.flip_test, sources_digest=files_digest([path], True))
            saved.update({f"features_{s}": feats, f"norms_{s}": norms, f"issame_{s}": np.asarray(issame, bool)})
            return feats, norms

        metrics = evaluator.score({s: embed_fn(s) for s in loaded},
                                  where={s: f"{loaded[s][0]} (extracted features)" for s in loaded})
        if req.save_features:
            save_npz(req.save_features, names=np.array(list(loaded)), **saved)
    rows, results, curves = [], metrics["sets"], {}
    for s, res in results.items():
        curves[s] = res.pop("roc")
        _report_dropped({f"{s}: {k}": res[k] for k in ("dropped_nan_rows", "dropped_pairs") if k in res})
        rows.append([s, f"{res['accuracy']:.4f}", f"{res['accuracy_std']:.4f}", f"{res['best_threshold']:.4f}",
                     f"{res['tar@far=1e-3']:.4f}", res["num_samples"]])
    mean_acc = metrics["mean_accuracy"]
    header = ["set", "accuracy", "std", "best_threshold", "tar@far=1e-3 (extra)", "num_images"]
    write_csv(output.path("hq_result.csv"), header, rows + [["mean", f"{mean_acc:.4f}", "", "", "", ""]])
    write_bytes(output.path("hq_roc.png"),
                plots.plot_roc(curves, title=f"{name}: HQ sets (10-fold mean)", log_x=False))
    _print_table(header, rows + [["mean", f"{mean_acc:.4f}", "", "", "", ""]])
    return {"sets": results, "mean_accuracy": mean_acc}


def _score(req, evaluator, key, num_images, flip_test, sources_fn, **score_kw):
    """Score ``evaluator`` on the --features file, or run it with an ``embed_fn`` that extracts (and
    caches) the model's features; ``sources_fn()`` fingerprints the source files for the cache key."""
    if req.features:
        z = load_features_npz(req.features)
        feats = feature_matrix(_require(z, "features", req.features), f"{req.features}: features", num_images)
        norms = _norm_column(z["norms"], f"{req.features}: norms", num_images) if "norms" in z else None
        if "fusion" in z and "fusion" in score_kw:
            score_kw["fusion"] = str(z["fusion"])
        return evaluator.score(feats, norms, where=req.features, **score_kw)
    extract = _Extractor(req)

    def embed_fn(images):
        digest = sources_fn() if req.cache_dir else None
        feats, norms = extract(images, key, flip_test=flip_test, sources_digest=digest, num_images=num_images)
        if req.save_features:
            save_npz(req.save_features, features=feats, norms=norms, fusion=np.array(req.fusion),
                     flip_test=np.array(flip_test))
        return feats, norms

    return evaluator.run(embed_fn)


def _require_data(req, what):
    if not req.data:
        raise InputError(f"--data ROOT ({what}) is required")
    if not io.isdir(req.data):
        raise InputError(f"--data {req.data}: not a folder ({what})")


def _run_ijb(req, output, name, ds):
    _require_data(req, f"the folder holding {ds}/")
    meta = ijb.load_meta(req.data, ds, unknown=req.unknown_templates)
    # The evaluator checks and parses the 1:N files now, before any expensive work; the caller aligns the crops.
    evaluator = IJBEvaluator(meta, lambda: (x[None] for x in iter_warped_crops(ijb.crop_paths(meta), meta.landmarks)),
                             fusion=req.fusion, unknown=req.unknown_templates, tie=req.tie, drop_nan=req.drop_nan,
                             identification=req.identification or "auto")
    if not req.features:
        _check_images_exist(ijb.crop_paths(meta), f"{ds} loose-crop")

    def sources():
        crops = ijb.crop_paths(meta)
        meta_digest = files_digest([meta.files["name_5pts"], meta.files["tid_mid"]], True)
        return f"{meta_digest}:{files_digest(crops, False)}"

    metrics = _score(req, evaluator, ds.lower(), meta.num_images, req.flip_test, sources, fusion=req.fusion)
    dropped = {k: v for k, v in metrics.items() if k not in ("verification", "identification")}
    _report_dropped(dropped)
    ver = metrics["verification"]
    fpr, tpr = ver.pop("fpr"), ver.pop("tpr")
    fars = list(ver["tar_at_far"])
    write_csv(output.path("verification_result.csv"), ["Methods"] + [str(f) for f in fars],
              [[f"{name}-{ds}"] + [f"{ver['tar_at_far'][f] * 100:.2f}" for f in fars]])
    write_bytes(output.path("verification_roc.png"),
                plots.plot_roc({f"{name}-{ds}": (fpr, tpr, ver["auc"])}, title=f"{ds} 1:1 ROC"))
    _print_table(["FAR"] + [f"{f:g}" for f in fars], [["TAR %"] + [f"{ver['tar_at_far'][f] * 100:.2f}" for f in fars]])
    out = {"verification": ver, **dropped}
    if evaluator.has_1n:
        ident = metrics["identification"]
        r = ident["rank"]
        write_csv(output.path("identification_result.csv"), ["", "top1", "top5", "top10"],
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
        out["identification"] = {"skipped": evaluator.skipped_1n, "missing_files": evaluator.missing_1n}
        print(f"{ds}: skipped identification: {evaluator.skipped_1n}", file=sys.stderr)
    return out


def _run_tinyface(req, output, name):
    _require_data(req, "holding aligned_pad_0.1_pad_high/")
    proto = tinyface.build_protocol(req.data, on_collision=req.tinyface_on_collision, mat_dir=req.tinyface_protocol)
    evaluator = TinyFaceEvaluator(proto, lambda: _imread_bgr(proto.image_paths), tie=req.tie, drop_nan=req.drop_nan)
    metrics = _score(req, evaluator, "tinyface", len(proto.image_paths), req.flip_test,
                     lambda: files_digest(proto.image_paths, False))
    res = metrics.pop("rank")
    dropped = metrics
    _report_dropped(dropped)
    write_csv(output.path("result.csv"), ["rank", "values"], [[k, v] for k, v in res.items()])
    write_bytes(output.path("cmc.png"), plots.plot_cmc({name: res}, title="TinyFace"))
    _print_table(["TinyFace", *(f"rank{k}" for k in res)], [[name, *(f"{v:.4f}" for v in res.values())]])
    return {"rank": res, **dropped}


def _run_ijbs(req, output, name):
    _require_data(req, "the IJB-S image root")
    list_path = req.ijbs_image_list or io.join(req.data, "image_list_mtcnn_fail_skipped_v1.csv")
    proto_dir = req.ijbs_protocol or io.join(req.data, "protocol")
    paths = ijbs.read_image_list(list_path)
    proto = ijbs.build_protocol(proto_dir)
    full = [io.join(req.data, p) for p in paths]
    if not req.features:
        _check_images_exist(full, "IJB-S")
    evaluator = IJBSEvaluator(proto, paths, lambda: _imread_bgr(full), tie=req.tie, drop_nan=req.drop_nan)
    res = _score(req, evaluator, "ijbs", len(paths), False, lambda: files_digest(full, False))
    dropped = {k: res.pop(k) for k in list(res) if k.startswith("dropped_")}
    _report_dropped(dropped)
    rows = []
    lines = []
    for proto_name, r in res.items():
        rk, op = r["rank"], r["tpir_at_fpir"]
        rows.append([proto_name, *(f"{v:.4f}" for v in rk.values()), *(f"{v:.4f}" for v in op.values())])
        lines += [f"{proto_name},rank1,rank5,rank10", "closedset," + ",".join(str(v) for v in rk.values()),
                  f"{proto_name},0.01_FPIR,0.1_FPIR", "openset," + ",".join(str(v) for v in op.values())]
    write_text(output.path("pre_norm_vector_add_cos_result.csv"), "\n".join(lines) + "\n")
    _print_table(["IJB-S", "rank1", "rank5", "rank10", "TPIR@1%", "TPIR@10%"], rows)
    return {**res, **dropped}


def _print_table(header, rows):
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols if i < len(r)) for i in range(len(header))]
    for j, r in enumerate(cols):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _checked(req: EvaluationRequest) -> EvaluationRequest:
    """The request with every path canonical (local absolute or ``gs://``; an unknown scheme or a one-slash URL
    is refused) and every output checked, before any work."""
    for field, allowed in (("protocol", PROTOCOLS), ("fusion", FUSION_METHODS), ("tie", TIE_ORDERS)):
        if getattr(req, field) not in allowed:
            raise InputError(f"--{field} {getattr(req, field)!r}: expected one of {', '.join(allowed)}")
    if req.identification is not None and req.identification not in IDENTIFICATION:
        raise InputError(f"--identification {req.identification!r}: expected one of {', '.join(IDENTIFICATION)}")
    if (req.checkpoint is None) == (req.features is None):
        raise InputError("give exactly one of --checkpoint and --features")
    paths = {}
    for attr, what in (("checkpoint", "--checkpoint"), ("features", "--features"), ("data", "--data"),
                       ("ijbs_image_list", "--ijbs-image-list"), ("ijbs_protocol", "--ijbs-protocol"),
                       ("tinyface_protocol", "--tinyface-protocol")):
        if getattr(req, attr):
            paths[attr] = io.check_path(getattr(req, attr), what)
    paths["bins"] = tuple(io.check_path(p, "--bin") for p in req.bins)
    if req.cache_dir:
        paths["cache_dir"] = io.check_creatable_dir(req.cache_dir, "--cache-dir")
    if req.save_features:
        paths["save_features"] = io.check_output_file(req.save_features, "--save-features", suffixes=(".npz",))
    if req.identification and req.protocol not in ("ijbb", "ijbc"):
        raise InputError(f"--identification applies to --protocol ijbb/ijbc, not {req.protocol}")
    return dataclasses.replace(req, **paths)


def run_evaluation(request: EvaluationRequest) -> dict:
    """Run ``request``: print the tables, write the outputs (results.json last) and return the summary that
    results.json holds. Bad input raises ``InputError`` or ``evaluation.ProtocolError`` naming the option, file
    or key, and leaves ``--out`` as it was."""
    req = _checked(request)
    source = req.checkpoint or req.features
    if req.checkpoint and not io.exists(req.checkpoint):
        raise InputError(f"--checkpoint {req.checkpoint}: no such file or folder")
    if req.features and not io.isfile(req.features):
        raise InputError(f"--features {req.features}: no such file")
    name = req.name or _stem(source)
    out = _Output(req.out or io.join("results", req.protocol, name), req.protocol)
    try:
        if req.protocol == "hq":
            results = _run_hq(req, out, name)
        elif req.protocol in ("ijbb", "ijbc"):
            results = _run_ijb(req, out, name, req.protocol.upper())
        elif req.protocol == "tinyface":
            results = _run_tinyface(req, out, name)
        else:
            results = _run_ijbs(req, out, name)
        summary = {"protocol": req.protocol, "name": name, "source": source, "fusion": req.fusion,
                   "flip_test": req.flip_test, "tie": req.tie, "drop_nan": bool(req.drop_nan),
                   "results": _jsonable(results)}
        write_text(out.path(RESULTS), json.dumps(summary, indent=2, allow_nan=True))
        out.commit()
    except BaseException:
        out.abort()
        raise
    print(f"results written to {out.out_dir}")
    return summary
