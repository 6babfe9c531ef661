"""IJB-S, rebuilt from the CS6 protocol CSVs (the original's validate_IJB_S.py and PFE's ijbs.py).

Templates are ``(subject, [media, ...])`` where a media is ``videos/<V>.mp4`` or ``img/<I>.jpg``.
Image rows are matched to templates by keys: image ``<PID>/videos_<V>_<F>.jpg`` -> ``PID_videos_V``,
``<PID>/img_<I>.jpg`` -> ``PID_img_I``; template media ``a/b.ext`` of subject s -> ``s_a_b``.
Per image the feature is the raw output ``e * n`` (no flip); a template is the mean of its
images' raw features divided by ``(||mean|| + 1e-8)``; templates without images are zeros.
Template order inside a set is sorted (the reference builds video templates with ``set()``,
which only changes tie-breaking). CSV lines are split on ',' after stripping the line end, so
the video galleries need 3 columns (the reference needs 4).
"""
from __future__ import annotations

import csv
import dataclasses
import io as pyio
import posixpath

import numpy as np
import scipy.sparse

from adaface_jax import io
from evaluation import ProtocolError, ranking

PROTOCOLS = (
    # name, probe set, gallery sets
    ("surveillance_to_single", "video2image_probe", ("single_image_gallery1", "single_image_gallery2")),
    ("surveillance_to_booking", "video2image_probe", ("booking_image_gallery1", "booking_image_gallery2")),
    ("multiview_surveillance_to_booking", "multiview_video_probe", ("booking_image_gallery1", "booking_image_gallery2")),
    ("surveillance_to_surveillance", "video2video_probe", ("video_gallery1", "video_gallery2")),
    ("uav_surveillance_to_booking", "uav_probe", ("booking_image_gallery1", "booking_image_gallery2")),
)
RANKS = (1, 5, 10)
FPIRS = (0.01, 0.1)


@dataclasses.dataclass(frozen=True)
class Template:
    subject: str
    media: tuple  # ("videos/5004.mp4", ...) or ("img/101146.jpg", ...)

    def keys(self):
        out = []
        for m in self.media:
            a, b = m.split("/", 1) if "/" in m else ("", m)
            out.append(f"{self.subject}_{a}_{posixpath.splitext(posixpath.basename(b))[0]}")
        return out


def _rows(path: str, min_cols: int, what: str):
    """(line number, fields) after the header; fields split on ',' with the line end stripped."""
    if not io.isfile(path):
        raise FileNotFoundError(f"IJB-S protocol file missing: {path}")
    lines = io.read_text(path).splitlines()
    out = []
    for i, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        tok = line.split(",")
        if len(tok) < min_cols:
            raise ProtocolError(f"{path}:{i}: expected >= {min_cols} comma-separated fields ({what}), got {len(tok)}")
        out.append((i, tok))
    return out


def build_protocol(folder: str) -> dict[str, list[Template]]:
    """All template sets of the CS6 protocols from ``folder`` (cs6_metadata.csv, probes, galleries/)."""
    meta_path = io.join(folder, "cs6_metadata.csv")
    meta = _rows(meta_path, 2, "subject_id, media path, ...")
    pairs = sorted({(t[0], t[1]) for _, t in meta if t[1].startswith("videos")})
    video_templates = [Template(s, (v,)) for s, v in pairs]
    by_video: dict[str, list[Template]] = {}
    for t in video_templates:
        by_video.setdefault(t.media[0], []).append(t)
    subject_of_media: dict[str, str] = {}
    for _, t in meta:
        subject_of_media.setdefault(t[1], t[0])
    pair_set = set(pairs)
    sets: dict[str, list[Template]] = {}

    for k in (1, 2):
        path = io.join(folder, "galleries", f"cs6_surveillance_to_surveillance_g{k}.csv")
        gal = []
        for line, t in _rows(path, 3, "_, subject_id, video path"):
            if (t[1], t[2]) not in pair_set:
                raise ProtocolError(f"{path}:{line}: (subject {t[1]!r}, video {t[2]!r}) is not in {meta_path}")
            gal.append(Template(t[1], (t[2],)))
        sets[f"video_gallery{k}"] = sorted(set(gal), key=lambda x: (x.subject, x.media))

    def video_probe(name):
        path = io.join(folder, name)
        listed = [t[0] for _, t in _rows(path, 1, "video path")]
        for v in listed:
            if v not in by_video:
                line = 2 + listed.index(v)
                raise ProtocolError(f"{path}:{line}: video {v!r} is not in {meta_path}")
        wanted = set(listed)
        return [t for t in video_templates if t.media[0] in wanted]

    sets["video2image_probe"] = video_probe("cs6_surveillance_to_single-booking_probe.csv")
    sets["video2video_probe"] = video_probe("cs6_surveillance_to_surveillance_probe.csv")
    subjects = sorted({t.subject for t in sets["video2video_probe"]})
    all_videos: dict[str, list[str]] = {}
    for s, v in pairs:
        all_videos.setdefault(s, []).append(v)
    sets["multiview_video_probe"] = [Template(s, tuple(all_videos[s])) for s in subjects]

    uav_path = io.join(folder, "cs6_uav_to_single-booking_probe.csv")
    uav = []
    for line, t in _rows(uav_path, 1, "media path"):
        entry = t[0]
        if entry.startswith("videos"):
            if entry not in by_video:
                raise ProtocolError(f"{uav_path}:{line}: video {entry!r} is not in {meta_path}")
            uav += by_video[entry]
        else:
            if entry not in subject_of_media:
                raise ProtocolError(f"{uav_path}:{line}: image {entry!r} has no subject in {meta_path}")
            uav.append(Template(subject_of_media[entry], (entry,)))
    sets["uav_probe"] = uav

    for k in (1, 2):
        path = io.join(folder, "galleries", f"cs6_surveillance_to_single_g{k}.csv")
        sets[f"single_image_gallery{k}"] = [Template(t[1], (t[2],)) for _, t in _rows(path, 3, "_, subject, image")]
        path = io.join(folder, "galleries", f"cs6_surveillance_to_booking_g{k}.csv")
        grouped: dict[str, list[str]] = {}
        for _, t in _rows(path, 3, "_, subject, image"):
            grouped.setdefault(t[1], []).append(t[2])
        sets[f"booking_image_gallery{k}"] = [Template(s, tuple(grouped[s])) for s in sorted(grouped)]
    for name, tpls in sets.items():
        if not tpls:
            raise ProtocolError(f"IJB-S set {name} is empty (from {folder})")
    return sets


def read_image_list(path: str) -> list[str]:
    """``image_list_*.csv`` (first column an index, a ``path`` column) -> relative image paths."""
    if not io.isfile(path):
        raise FileNotFoundError(f"IJB-S image list missing: {path}")
    with pyio.StringIO(io.read_text(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or "path" not in header:
            raise ProtocolError(f"{path}:1: expected a header with a 'path' column, got {header}")
        col = header.index("path")
        paths = []
        for i, row in enumerate(reader, 2):
            if len(row) <= col:
                raise ProtocolError(f"{path}:{i}: missing the 'path' column")
            paths.append(row[col])
    return paths


def image_key(path: str) -> str:
    """``<PID>/videos_<V>_<F>.jpg`` -> ``PID_videos_V``; ``<PID>/img_<I>.jpg`` -> ``PID_img_I``."""
    pid = posixpath.basename(posixpath.dirname(path))  # a relative path of the image list
    stem = posixpath.splitext(posixpath.basename(path))[0]
    if stem.startswith("videos_"):
        parts = stem.split("_")
        if len(parts) < 3:
            raise ProtocolError(f"{path}: video frame names are videos_<video>_<frame>.jpg")
        return f"{pid}_videos_{parts[1]}"
    return f"{pid}_{stem}"


def template_features(templates: list[Template], image_keys: list[str], raw_feats: np.ndarray,
                      eps: float = 1e-8) -> np.ndarray:
    """mean of each template's raw image features / (||mean|| + eps); zeros for empty templates."""
    index: dict[str, list[int]] = {}
    for i, k in enumerate(image_keys):
        index.setdefault(k, []).append(i)
    rows, cols = [], []
    for t_i, t in enumerate(templates):
        for k in t.keys():
            got = index.get(k, ())
            cols.extend(got)
            rows.extend([t_i] * len(got))
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    counts = np.bincount(rows, minlength=len(templates)).astype(np.float64)
    weights = 1.0 / np.where(counts == 0, 1, counts)[rows]
    pool = scipy.sparse.csr_matrix((weights, (rows, cols)), shape=(len(templates), raw_feats.shape[0]))
    mean = pool @ np.asarray(raw_feats, np.float64)
    return (mean / (np.linalg.norm(mean, axis=1, keepdims=True) + eps)).astype(np.float32)


def identification(probe_feats, probe_subjects, gallery_feats, gallery_subjects, tie="stable",
                   ranks=RANKS, fpirs=FPIRS) -> dict:
    """Closed set over ``[G1 | G2]`` (rank-1/5/10) and open-set DIR@FPIR per gallery, averaged."""
    ps = np.asarray(probe_subjects)
    g_all = np.concatenate(gallery_feats)
    gs_all = np.concatenate([np.asarray(g) for g in gallery_subjects])
    mates = ps[:, None] == gs_all[None, :]
    multi = np.flatnonzero(mates.sum(1) > 1)
    if multi.size:
        raise ProtocolError(f"probe {int(multi[0])} (subject {ps[multi[0]]}) has {int(mates[multi[0]].sum())} "
                            "mates across the galleries; at most 1 is allowed")
    rk, _, _ = ranking.mate_ranks_chunked(probe_feats, g_all, lambda idx: mates[idx], tie)
    out = {"rank": ranking.cmc(rk, ranks)}
    per = []
    for g_i, (gf, gsub) in enumerate(zip(gallery_feats, gallery_subjects), 1):
        gsub = np.asarray(gsub)
        m = ps[:, None] == gsub[None, :]
        mated = m.any(1)
        rk_g, ms_g, _ = ranking.mate_ranks_chunked(probe_feats[mated], gf, lambda idx, mm=m[mated]: mm[idx], tie)
        _, _, nm_max = ranking.mate_ranks_chunked(probe_feats[~mated], gf,
                                                  lambda idx: np.zeros((idx.size, gsub.size), bool), tie)
        try:
            per.append(ranking.open_set_dir(rk_g, ms_g, nm_max, fpirs))
        except ValueError as e:
            raise ProtocolError(f"gallery {g_i} ({gsub.size} templates): {e}") from None
    out["open_set_per_gallery"] = per
    out["tpir_at_fpir"] = {f: float(np.mean([p[f] for p in per])) for f in map(float, fpirs)}
    return out


def evaluate(protocol: dict[str, list[Template]], image_paths: list[str], raw_feats: np.ndarray,
             names=None, tie="stable") -> dict[str, dict]:
    """Score every CS6 protocol (``names`` selects a subset) from per-image raw features."""
    if raw_feats.shape[0] != len(image_paths):
        raise ProtocolError(f"{raw_feats.shape[0]} features but {len(image_paths)} image paths")
    keys = [image_key(p) for p in image_paths]
    cache: dict[str, np.ndarray] = {}

    def feats(set_name):
        if set_name not in cache:
            cache[set_name] = template_features(protocol[set_name], keys, raw_feats)
        return cache[set_name]

    results = {}
    for name, probe_set, gallery_sets in PROTOCOLS:
        if names is not None and name not in names:
            continue
        subj = lambda s: np.array([t.subject for t in protocol[s]])  # noqa: E731
        try:
            results[name] = identification(feats(probe_set), subj(probe_set), [feats(g) for g in gallery_sets],
                                           [subj(g) for g in gallery_sets], tie=tie)
        except ValueError as e:
            raise ProtocolError(f"IJB-S {name} ({probe_set} vs {'/'.join(gallery_sets)}): {e}") from None
    return results
