"""IJB-B / IJB-C (the original's validation_mixed/validate_IJB_BC.py): meta readers, template pooling, 1:1 ROC, 1:N.

Everything is numpy and vectorized for the real scale (IJB-C: 469,375 images, 23,124 templates,
15,658,489 pairs): template pooling is two sparse matrix products, pair scores are per-pair sums
computed in chunks (position independent, as the reference), the ROC is one stable sort. Unknown
template ids, mismatched files and malformed lines raise ``evaluation.ProtocolError`` naming the
file and line.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse

from adaface_jax import io
from evaluation import ProtocolError, ranking

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
GALLERY_NAMES = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}


# ----------------------------------------------------------------------------------------------
# readers of the meta files


def _lines(path):
    return io.read_text(path).splitlines()


def _loadtxt(path, **kwargs):
    """``np.loadtxt`` of a local or ``gs://`` file (its C parser takes the open file)."""
    with io.open(path, "r", encoding="utf-8") as f:
        return np.loadtxt(f, **kwargs)


def read_name_5pts_score(path: str):
    """``name x1 y1 ... x5 y5 score`` per line -> ``(names, landmarks (N,5,2) float32, scores (N,))``."""
    lines = _lines(path)
    if not lines:
        raise ProtocolError(f"{path}: no lines")
    names = []
    for i, line in enumerate(lines, 1):
        tok = line.split()
        if len(tok) != 12:
            raise ProtocolError(f"{path}:{i}: expected 12 space-separated fields "
                                f"(name, 10 landmark coordinates, score), got {len(tok)}")
        names.append(tok[0])
    try:  # the C parser for the numbers
        arr = _loadtxt(path, dtype=np.float32, usecols=range(1, 12), ndmin=2, comments=None)
    except ValueError:
        for i, line in enumerate(lines, 1):
            try:
                [float(t) for t in line.split()[1:]]
            except ValueError as e:
                raise ProtocolError(f"{path}:{i}: non-numeric landmark/score: {e}") from None
        raise ProtocolError(f"{path}: cannot parse the landmarks/scores as numbers") from None
    return names, arr[:, :10].reshape(-1, 5, 2), arr[:, 10]


def _scan_table(path, lines, start, ncols, what, sep, min_cols):
    """Line-by-line parse (small files, or to name the bad line after a fast parse failed)."""
    rows, width = [], None
    for i, line in enumerate(lines[start:], start + 1):
        tok = [t.strip() for t in line.split(sep)] if sep else line.split()
        if width is None:
            width = len(tok)
        if (min_cols is None and len(tok) != ncols) or (min_cols is not None and len(tok) < min_cols):
            want = ncols if min_cols is None else f">= {min_cols}"
            raise ProtocolError(f"{path}:{i}: expected {want} fields ({what}), got {len(tok)}")
        if len(tok) != width:
            raise ProtocolError(f"{path}:{i}: {len(tok)} fields but the first data line has {width} ({what})")
        try:
            rows.append([int(t) for t in tok[:ncols]])
        except ValueError:
            raise ProtocolError(f"{path}:{i}: expected integers in the first {ncols} fields ({what}): "
                                f"{line!r}") from None
    if not rows:
        raise ProtocolError(f"{path}: no data lines; expected {what}")
    return np.asarray(rows, np.int64)


def _int_table(path: str, ncols: int, what: str, skip_header: bool = False, sep=None, min_cols=None):
    """Integer table with a consistent field count; errors name the file and line."""
    start = 1 if skip_header else 0
    if sep is None and min_cols is None:
        try:  # fast C parser for the 15.6M-line pair file; rescanned only to report an error
            table = _loadtxt(path, dtype=np.int64, ndmin=2, skiprows=start)
            if table.shape[0] and table.shape[1] == ncols:
                return table
        except ValueError:
            pass
    lines = _lines(path)
    if skip_header and not lines:
        raise ProtocolError(f"{path}: empty file; expected a header line")
    return _scan_table(path, lines, start, ncols, what, sep, min_cols)


def read_face_tid_mid(path: str):
    """``name template_id media_id`` -> ``(templates (N,), medias (N,))`` int64 (names ignored)."""
    lines = _lines(path)
    t = np.empty(len(lines), np.int64)
    m = np.empty(len(lines), np.int64)
    for i, line in enumerate(lines):
        tok = line.split()
        if len(tok) != 3:
            raise ProtocolError(f"{path}:{i + 1}: expected 3 fields 'name template_id media_id', got {len(tok)}")
        try:
            t[i], m[i] = int(tok[1]), int(tok[2])
        except ValueError:
            raise ProtocolError(f"{path}:{i + 1}: template_id/media_id must be integers: {line!r}") from None
    if not lines:
        raise ProtocolError(f"{path}: no lines")
    return t, m


def read_template_pair_label(path: str):
    """``t1 t2 label`` -> three int64 arrays; label must be 0 or 1."""
    table = _int_table(path, 3, "t1 t2 label")
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise ProtocolError(f"{path}:{bad[0] + 1}: label must be 0 or 1, got {table[bad[0], 2]}")
    return table[:, 0], table[:, 1], table[:, 2]


def read_1n_csv(path: str):
    """1:N CSV (one header, comma separated, TEMPLATE_ID, SUBJECT_ID, ...) -> (tids, sids, line numbers).

    Every row must have the header's field count (as np.loadtxt in the reference)."""
    lines = _lines(path)
    if not lines:
        raise ProtocolError(f"{path}: empty file; expected a header line")
    body = lines[1:]
    if not body:
        raise ProtocolError(f"{path}: no data lines; expected TEMPLATE_ID,SUBJECT_ID,...")
    commas = np.fromiter((l.count(",") for l in body), np.int64, len(body))
    bad = np.flatnonzero((commas != commas[0]) | (commas < 1))
    if bad.size:
        i = int(bad[0])
        what = "expected >= 2 fields (TEMPLATE_ID,SUBJECT_ID,...)" if commas[i] < 1 else \
            f"{commas[i] + 1} fields but the first data line has {commas[0] + 1}"
        raise ProtocolError(f"{path}:{i + 2}: {what}")
    try:
        table = np.loadtxt(body, dtype=np.int64, delimiter=",", usecols=(0, 1), ndmin=2, comments=None)
    except ValueError:
        table = _scan_table(path, lines, 1, 2, "TEMPLATE_ID,SUBJECT_ID,...", ",", 2)
    return table[:, 0], table[:, 1], np.arange(2, table.shape[0] + 2)


@dataclasses.dataclass
class IJBMeta:
    """Meta data of one IJB set; row i of every per-image array is image i (line order)."""
    name: str                    # "IJBB" or "IJBC"
    root: str                    # <root>/<DS>
    image_names: list
    landmarks: np.ndarray        # (N, 5, 2) loose-crop pixel coordinates
    faceness: np.ndarray         # (N,) parsed, unused (as the reference)
    templates: np.ndarray        # (N,) template id per image
    medias: np.ndarray           # (N,) media id per image
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_label: np.ndarray
    files: dict
    # templates left out by drop_images (their 1:N gallery/probe rows are skipped too)
    dropped_templates: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_images(self):
        return len(self.image_names)


def meta_paths(root: str, ds: str) -> dict:
    ds_up, ds_lo = ds.upper(), ds.lower()
    meta = io.join(root, ds_up, "meta")
    g1, g2 = GALLERY_NAMES[ds_up]
    return {
        "name_5pts": io.join(meta, f"{ds_lo}_name_5pts_score.txt"),
        "tid_mid": io.join(meta, f"{ds_lo}_face_tid_mid.txt"),
        "pair_label": io.join(meta, f"{ds_lo}_template_pair_label.txt"),
        "gallery1": io.join(meta, f"{ds_lo}_1N_gallery_{g1}.csv"),
        "gallery2": io.join(meta, f"{ds_lo}_1N_gallery_{g2}.csv"),
        "probe": io.join(meta, f"{ds_lo}_1N_probe_mixed.csv"),
        "loose_crop": io.join(root, ds_up, "loose_crop"),
    }


ONE_TO_N_KEYS = ("gallery1", "gallery2", "probe")


def missing_1n_files(meta_or_files) -> list:
    """The 1:N files (gallery1, gallery2, probe) that are not there, as paths (empty when all are)."""
    files = meta_or_files.files if isinstance(meta_or_files, IJBMeta) else meta_or_files
    return [files[k] for k in ONE_TO_N_KEYS if not io.isfile(files[k])]


def load_meta(root: str, ds: str, unknown: str = "error") -> IJBMeta:
    """Read and cross-check the 1:1 meta files of ``<root>/<DS>/meta`` (``unknown``: see check_known)."""
    ds = ds.upper()
    if ds not in GALLERY_NAMES:
        raise ProtocolError(f"unknown IJB dataset {ds!r}; expected IJBB or IJBC")
    files = meta_paths(root, ds)
    for key in ("name_5pts", "tid_mid", "pair_label"):
        if not io.isfile(files[key]):
            raise FileNotFoundError(f"{ds}: missing meta file {files[key]}")
    names, lm, score = read_name_5pts_score(files["name_5pts"])
    templates, medias = read_face_tid_mid(files["tid_mid"])
    if len(names) != templates.size:
        raise ProtocolError(f"{files['tid_mid']}: {templates.size} lines but {files['name_5pts']} has {len(names)}; "
                            "line i of both files must be the same image")
    t1, t2, label = read_template_pair_label(files["pair_label"])
    known = np.unique(templates)
    for col, arr in (("t1", t1), ("t2", t2)):
        check_known(known, arr, files["pair_label"], col, unknown=unknown)
    return IJBMeta(ds, io.join(root, ds), names, lm, score, templates, medias, t1, t2, label, files)


def check_known(known_sorted: np.ndarray, ids: np.ndarray, path: str, what: str, line_numbers=None,
                unknown: str = "error"):
    """Row of each id in ``known_sorted``; an unknown id raises naming its line.

    ``unknown="row0"`` reproduces the reference instead: unknown ids silently use row 0.
    """
    pos = np.searchsorted(known_sorted, ids)
    ok = (pos < known_sorted.size) & (known_sorted[np.minimum(pos, known_sorted.size - 1)] == ids)
    if unknown == "row0":
        return np.where(ok, pos, 0)
    if unknown != "error":
        raise ProtocolError(f"unknown must be 'error' or 'row0', got {unknown!r}")
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        line = int(line_numbers[i]) if line_numbers is not None else i + 1
        raise ProtocolError(f"{path}:{line}: unknown template id {int(ids[i])} in column {what} "
                            "(not in the face_tid_mid file)")
    return pos


def drop_images(meta: IJBMeta, keep: np.ndarray) -> tuple[IJBMeta, dict]:
    """Leave images out (``keep`` False, e.g. NaN features of failed photos): their templates are
    pooled from the remaining images; templates with no image left and the 1:1 pairs that use
    them are left out too. Returns the reduced meta and counts of what was dropped."""
    keep = np.asarray(keep, bool)
    if keep.shape != (meta.num_images,):
        raise ProtocolError(f"keep mask has {keep.shape} entries but {meta.files['name_5pts']} has "
                            f"{meta.num_images} images")
    before = np.unique(meta.templates)
    left = np.unique(meta.templates[keep])
    gone = np.setdiff1d(before, left)
    pair_ok = ~(np.isin(meta.pair_t1, gone) | np.isin(meta.pair_t2, gone))
    reduced = dataclasses.replace(
        meta, image_names=[n for n, k in zip(meta.image_names, keep) if k], landmarks=meta.landmarks[keep],
        faceness=meta.faceness[keep], templates=meta.templates[keep], medias=meta.medias[keep],
        pair_t1=meta.pair_t1[pair_ok], pair_t2=meta.pair_t2[pair_ok], pair_label=meta.pair_label[pair_ok],
        dropped_templates=np.union1d(meta.dropped_templates, gone))
    return reduced, {"dropped_images": int((~keep).sum()), "dropped_templates": int(gone.size),
                     "dropped_pairs": int((~pair_ok).sum())}


# ----------------------------------------------------------------------------------------------
# image features (``infer_images``)


def crop_paths(meta: IJBMeta) -> list[str]:
    """The loose crop of every image, in line order; the caller aligns them with the landmarks
    (``adaface_jax.align.iter_warped_crops(paths, meta.landmarks, method="umeyama")``, the original's
    ``ImageAligner``: cv2.imread, then a 5-point Umeyama warp to the 112x112 template)."""
    return [io.join(meta.files["loose_crop"], name) for name in meta.image_names]


def image_features_for_templates(features: np.ndarray, norms: np.ndarray | None, fusion: str) -> np.ndarray:
    """As ``infer_images``: with pre_norm_vector_add the image feature is ``feature * norm`` (the raw output sum)."""
    features = np.asarray(features, np.float32)
    if fusion == "pre_norm_vector_add":
        if norms is None:
            raise ProtocolError("pre_norm_vector_add image features need the norms")
        return features * np.asarray(norms, np.float32).reshape(-1, 1)
    return features


# ----------------------------------------------------------------------------------------------
# template pooling (``eval_helper.image2template_feature``)


def image_to_template(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      normalize: str = "sklearn"):
    """Template features: mean per (template, media), summed per template, L2-normalised.

    ``normalize='sklearn'`` keeps all-zero rows zero (the verification path); ``'divide'`` divides
    by the norm directly so a zero row becomes NaN (the identification path).
    Returns ``(unique_templates (T,) ascending, template_feats (T, D) float32)``.
    """
    img_feats = np.asarray(img_feats)
    n = img_feats.shape[0]
    if templates.shape != (n,) or medias.shape != (n,):
        raise ProtocolError(f"{n} image features but {templates.shape[0]} template ids / {medias.shape[0]} media ids")
    unique_t, t_inv = np.unique(templates, return_inverse=True)
    pairs, tm_inv = np.unique(np.stack([t_inv, medias], axis=1), axis=0, return_inverse=True)
    tm_inv = tm_inv.reshape(-1)
    counts = np.bincount(tm_inv, minlength=pairs.shape[0])
    # Mean over the images of each media, then sum over the media of each template: two sparse
    # products in float32 like the reference's float32 numpy (no float64 copy of 469k x 512).
    dtype = np.float64 if img_feats.dtype == np.float64 else np.float32
    weights = (1.0 / counts[tm_inv]).astype(dtype)
    to_media = scipy.sparse.csr_matrix((weights, (tm_inv, np.arange(n))), shape=(pairs.shape[0], n))
    media_feats = to_media @ np.asarray(img_feats, dtype)
    to_template = scipy.sparse.csr_matrix((np.ones(pairs.shape[0], dtype), (pairs[:, 0], np.arange(pairs.shape[0]))),
                                          shape=(unique_t.size, pairs.shape[0]))
    t_feats = to_template @ media_feats
    del media_feats
    norm = np.linalg.norm(t_feats, axis=1, keepdims=True)
    if normalize == "sklearn":
        t_feats = t_feats / np.where(norm == 0, 1.0, norm)
    elif normalize == "divide":
        with np.errstate(invalid="ignore", divide="ignore"):
            t_feats = t_feats / norm
    else:
        raise ProtocolError(f"normalize must be 'sklearn' or 'divide', got {normalize!r}")
    return unique_t, t_feats.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# 1:1 verification (``verification``)


def pair_scores(unique_t, t_feats, t1, t2, chunk: int = 4096, path: str = "<pairs>",
                unknown: str = "error") -> np.ndarray:
    """Cosine per pair ``<T[t1], T[t2]>`` (float32); unknown ids raise (no silent row 0).

    Computed per pair exactly as the reference (``np.sum(feat1 * feat2, -1)`` over chunks of
    pairs): each score is an elementwise float32 product followed by numpy's fixed-order sum over
    D, so it depends only on the two feature rows, never on their positions. Identical templates
    therefore give bit-identical scores and the ROC keeps the reference's exact ties (a blocked
    matrix product splits such ties: BLAS kernels sum in position-dependent orders).
    """
    r1 = check_known(unique_t, t1, path, "t1", unknown=unknown)
    r2 = check_known(unique_t, t2, path, "t2", unknown=unknown)
    t_feats = np.ascontiguousarray(t_feats, np.float32)
    out = np.empty(r1.size, np.float32)
    chunk = max(1, min(int(chunk), r1.size))
    buf_a = np.empty((chunk, t_feats.shape[1]), np.float32)  # reused: no allocation per chunk
    buf_b = np.empty_like(buf_a)
    for start in range(0, r1.size, chunk):
        stop = min(r1.size, start + chunk)
        a, b = buf_a[:stop - start], buf_b[:stop - start]
        np.take(t_feats, r1[start:stop], axis=0, out=a, mode="clip")  # rows checked above; "clip"
        np.take(t_feats, r2[start:stop], axis=0, out=b, mode="clip")  # is the unbuffered gather
        np.multiply(a, b, out=a)
        np.sum(a, -1, out=out[start:stop])
    return out


def roc_curve(labels, scores):
    """sklearn ``roc_curve(labels, scores)`` with ``drop_intermediate=True``: ``(fpr, tpr, thresholds)``.

    Only run ends of equal scores matter, so instead of an argsort the scores are sorted once
    and the genuine count above each distinct score comes from the (few) sorted genuine scores.
    """
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores).reshape(-1)
    if y.size != s.size:
        raise ProtocolError(f"{y.size} labels but {s.size} scores")
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ProtocolError("scores contain NaN")
    s_desc = np.sort(s)[::-1]
    idx = np.r_[np.flatnonzero(s_desc[1:] != s_desc[:-1]), y.size - 1]
    thresholds = s_desc[idx]
    pos_sorted = np.sort(s[y])
    tps = pos_sorted.size - np.searchsorted(pos_sorted, thresholds, side="left")  # genuine with score >= thr
    fps = 1 + idx - tps
    if tps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    if fps[-1] == 0 or tps[-1] == 0:
        raise ProtocolError("ROC needs both genuine (label 1) and impostor (label 0) pairs")
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr, tpr, far_targets=FAR_TARGETS) -> dict[float, float]:
    """Nearest-FPR TAR (no interpolation) with the reference's tie rules (reversed arrays, first argmin)."""
    fpr_r, tpr_r = np.flipud(fpr), np.flipud(tpr)
    return {float(x): float(tpr_r[np.argmin(np.abs(fpr_r - x))]) for x in far_targets}


def auc(fpr, tpr) -> float:
    return float(np.trapezoid(tpr, fpr))


def verification_11(meta: IJBMeta, img_feats: np.ndarray, far_targets=FAR_TARGETS, unknown: str = "error") -> dict:
    """1:1 TAR@FAR of one IJB set from per-image features (line order).

    ``unknown="row0"`` scores pairs with unknown template ids against row 0 like the reference
    (``load_meta(..., unknown="row0")`` must then be used too)."""
    if img_feats.shape[0] != meta.num_images:
        raise ProtocolError(f"{img_feats.shape[0]} image features but {meta.files['name_5pts']} has "
                            f"{meta.num_images} lines")
    unique_t, t_feats = image_to_template(img_feats, meta.templates, meta.medias, normalize="sklearn")
    scores = pair_scores(unique_t, t_feats, meta.pair_t1, meta.pair_t2, path=meta.files["pair_label"], unknown=unknown)
    fpr, tpr, _ = roc_curve(meta.pair_label, scores)
    return {"tar_at_far": tar_at_far(fpr, tpr, far_targets), "auc": auc(fpr, tpr), "fpr": fpr, "tpr": tpr,
            "num_pairs": int(scores.size), "num_genuine": int(meta.pair_label.sum())}


# ----------------------------------------------------------------------------------------------
# 1:N identification (``identification``, ``eval_helper_identification``)


def _template_subjects(tids, sids, lines):
    """Unique templates (ascending) with the subject of each one's first occurrence."""
    unique_t, first = np.unique(tids, return_index=True)
    return unique_t, sids[first], lines[first]


def identification_1n(meta: IJBMeta, img_feats: np.ndarray, tie: str = "stable",
                      ranks=(1, 5, 10), fpirs=(0.01, 0.1)) -> dict:
    """Rank-1/5/10 over G1∪G2 (reference), its pooled non-standard "TPIR@FPIR", and the standard
    per-gallery TPIR@FPIR (InsightFace ``evaluation_1N``), each clearly labelled."""
    files = meta.files
    missing = missing_1n_files(files)
    if missing:
        raise FileNotFoundError(f"{meta.name}: missing 1:N file(s) {', '.join(missing)}")
    if img_feats.shape[0] != meta.num_images:
        raise ProtocolError(f"{img_feats.shape[0]} image features but {meta.num_images} images in the meta files")
    known_t, t_feats = image_to_template(img_feats, meta.templates, meta.medias, normalize="divide")

    result_dropped = {}

    def read(key):
        tids, sids, lines = read_1n_csv(files[key])
        if meta.dropped_templates.size:  # templates left out by drop_images
            gone = np.isin(tids, meta.dropped_templates)
            result_dropped[f"dropped_{key}_templates"] = int(np.unique(tids[gone]).size)
            tids, sids, lines = tids[~gone], sids[~gone], lines[~gone]
        check_known(known_t, tids, files[key], "TEMPLATE_ID", lines)
        return tids, sids, lines

    g_parts = [read("gallery1"), read("gallery2")]
    p_tids, p_sids, p_lines = read("probe")

    g_all_t = np.concatenate([g_parts[0][0], g_parts[1][0]])
    g_all_s = np.concatenate([g_parts[0][1], g_parts[1][1]])
    g_all_l = np.concatenate([g_parts[0][2], g_parts[1][2]])
    g_t, g_s, _ = _template_subjects(g_all_t, g_all_s, g_all_l)
    if g_t.size == 0:
        raise ProtocolError(f"{files['gallery1']} + {files['gallery2']}: empty gallery")
    p_t, p_s, p_l = _template_subjects(p_tids, p_sids, p_lines)
    g_feats = t_feats[np.searchsorted(known_t, g_t)]
    p_feats = t_feats[np.searchsorted(known_t, p_t)]

    # Exactly one gallery template per probe subject (the reference raises otherwise).
    g_order = np.argsort(g_s, kind="stable")
    g_sorted = g_s[g_order]
    lo = np.searchsorted(g_sorted, p_s, "left")
    hi = np.searchsorted(g_sorted, p_s, "right")
    if meta.dropped_templates.size:  # a probe whose only mate was left out cannot be ranked
        orphan = hi == lo
        result_dropped["dropped_probes_without_mate"] = int(orphan.sum())
        p_t, p_s, p_l, p_feats, lo, hi = (x[~orphan] for x in (p_t, p_s, p_l, p_feats, lo, hi))
    bad = np.flatnonzero(hi - lo != 1)
    if bad.size:
        i = bad[0]
        raise ProtocolError(f"{files['probe']}:{int(p_l[i])}: probe template {int(p_t[i])} (subject {int(p_s[i])}) "
                            f"has {int(hi[i] - lo[i])} mates in the merged gallery; exactly 1 is required")
    mate_col = g_order[lo]

    def is_mate(idx):
        m = np.zeros((idx.size, g_t.size), bool)
        m[np.arange(idx.size), mate_col[idx]] = True
        return m

    rk, _, _ = ranking.mate_ranks_chunked(p_feats, g_feats, is_mate, tie=tie)
    result = {"rank": ranking.cmc(rk, ranks), "num_probes": int(p_t.size), "num_gallery": int(g_t.size),
              **result_dropped}
    result["reference_pooled_tpir_at_fpir"] = _reference_pooled_tpir(p_feats, g_feats, mate_col, fpirs)

    # standard per-gallery protocol: probes whose subject is not in gallery k are non-mated there.
    per_gallery = {}
    for k, (tids, sids, lines) in enumerate(g_parts, 1):
        gname = GALLERY_NAMES[meta.name][k - 1]
        gt, gs, _ = _template_subjects(tids, sids, lines)
        gf = t_feats[np.searchsorted(known_t, gt)]
        mated = np.isin(p_s, gs)
        if not mated.any() or mated.all():
            per_gallery[gname] = {float(f): float("nan") for f in fpirs}  # undefined without both kinds
            continue

        def is_mate_k(idx, gs=gs, p_s_m=p_s[mated]):
            return p_s_m[idx, None] == gs[None, :]
        _, ms, mnm = ranking.mate_ranks_chunked(p_feats[mated], gf, is_mate_k, tie=tie)
        _, _, nm_max = ranking.mate_ranks_chunked(p_feats[~mated], gf, 
                                                  lambda idx: np.zeros((idx.size, gs.size), bool))
        per_gallery[gname] = ranking.standard_tpir_fpir(ms, mnm, nm_max, fpirs)
    result["standard_tpir_at_fpir"] = per_gallery
    result["standard_tpir_at_fpir_mean"] = {f: float(np.mean([g[f] for g in per_gallery.values()]))
                                            for f in map(float, fpirs)}
    return result


def _reference_pooled_tpir(p_feats, g_feats, mate_col, fpirs, chunk=4096) -> dict[float, float]:
    """The reference's printed "TPIR@FPIR": ``k = ceil(Nq*far)``, threshold = k-th largest of ALL
    pooled non-mate scores, ``recall = mean(mate score > th)``; no rank-1 condition (non-standard)."""
    nq, ng = p_feats.shape[0], g_feats.shape[0]
    ks = {f: int(np.ceil(nq * f)) for f in map(float, fpirs)}
    kmax = max(ks.values())
    top = np.empty(0, np.float32)  # running top-kmax of non-mate scores
    pos = np.empty(nq, np.float32)
    for idx, s in ranking.score_chunks(p_feats, g_feats, chunk):  # identical rows -> identical scores
        s = s.astype(np.float32, copy=False)
        rows = np.arange(idx.size)
        pos[idx] = s[rows, mate_col[idx]]
        s[rows, mate_col[idx]] = -np.inf
        neg = np.concatenate([top, s.reshape(-1)])
        if neg.size > kmax:
            neg = np.partition(neg, neg.size - kmax)[neg.size - kmax:]
        top = neg
    top = np.sort(top)[::-1]
    out = {}
    n_neg = nq * (ng - 1)
    for f, k in ks.items():
        if k < 1 or k > n_neg:
            out[f] = float("nan")
            continue
        out[f] = float(np.mean(pos > top[k - 1]))
    return out
