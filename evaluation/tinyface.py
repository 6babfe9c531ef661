"""TinyFace rank-k identification (the original's validate_tinyface.py, tinyface_helper.py), deterministic.

Layout under ``data_root``: the aligned copy ``aligned_pad_0.1_pad_high/{Probe,Gallery_Match,
Gallery_Distractor}/`` (112x112, features are extracted from these, in sorted path order) and the
raw split ``tinyface/Testing_Set/{Probe,Gallery_Match,Gallery_Distractor}/`` that defines set
membership (when absent, membership comes from the aligned folders). When the release's protocol
files ``probe_img_ID_pairs.mat`` / ``gallery_match_img_ID_pairs.mat`` are present (in
``tinyface/Testing_Set/``) they define the probe and gallery-match sets and their identity ids
(the ids differ from the file-name prefixes but define the same mates). Files are matched by
file stem; a stem that occurs twice is an error (the reference silently keeps the last one;
``on_collision="last"`` reproduces that). Label = ``int(stem.split('_')[0])``, distractors -100.
Features stay unit vectors (not multiplied by the norm). Ranks 1, 5, 20; a probe succeeds at
rank r when ANY mate is in its top r; probes without a mate are not counted.
"""
from __future__ import annotations

import dataclasses
import posixpath

import numpy as np
import scipy.io

from adaface_jax import io
from evaluation import ProtocolError, ranking

SETS = ("Probe", "Gallery_Match", "Gallery_Distractor")
EXTENSIONS = (".jpg", ".png", ".jpeg")
ALIGNED_DIR = "aligned_pad_0.1_pad_high"
RAW_DIR = "tinyface/Testing_Set"
RANKS = (1, 5, 20)
DISTRACTOR_LABEL = -100


def list_images(folder: str, required: bool = True) -> list[str]:
    """All image files below ``folder`` (local or ``gs://``; case-insensitive extension), sorted by relative
    path."""
    if not io.isdir(folder):
        if not required:
            return []
        raise FileNotFoundError(f"TinyFace folder not found: {folder}")
    found = []
    for dirpath, _, filenames in io.walk(folder):
        rel = dirpath[len(folder):].strip("/")
        for f in filenames:
            if f.lower().endswith(EXTENSIONS):
                found.append((f"{rel}/{f}" if rel else f, io.join(dirpath, f)))
    return [p for _, p in sorted(found)]  # by relative path, as os.path.relpath orders them


def _stem(path: str) -> str:
    return posixpath.splitext(io.basename(path))[0]


def label_of(path: str) -> int:
    head = _stem(path).split("_")[0]
    try:
        return int(head)
    except ValueError:
        raise ProtocolError(f"{path}: TinyFace file names start with '<identity>_'; cannot read an integer "
                            f"identity from {head!r}") from None


@dataclasses.dataclass
class TinyFaceProtocol:
    image_paths: list          # aligned images, the feature rows, in this order
    probe_rows: np.ndarray
    probe_labels: np.ndarray
    gallery_rows: np.ndarray   # match images then distractors
    gallery_labels: np.ndarray


MAT_FILES = {"probe": ("probe_img_ID_pairs.mat", "probe_set", "probe_ids"),
             "gallery": ("gallery_match_img_ID_pairs.mat", "gallery_set", "gallery_ids")}


def read_protocol_mat(path: str, which: str) -> tuple[list[str], np.ndarray]:
    """One TinyFace protocol file -> ``(file names, identity ids)``.

    ``probe_img_ID_pairs.mat`` holds ``probe_set`` (N x 1 cell of file names) and ``probe_ids``
    (N x 1 integers); ``gallery_match_img_ID_pairs.mat`` holds ``gallery_set``/``gallery_ids``
    (the TinyFace release's MATLAB scoring inputs). Anything else raises ProtocolError.
    """
    _, set_key, id_key = MAT_FILES[which]
    try:
        mat = scipy.io.loadmat(io.readable(path))
    except (ValueError, TypeError, NotImplementedError, IndexError, KeyError, EOFError) as e:
        raise ProtocolError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e}); expected "
                            f"{set_key!r} and {id_key!r}") from None
    missing = [k for k in (set_key, id_key) if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ProtocolError(f"{path}: missing variable(s) {missing}; expected {set_key!r} (cell of file names) and "
                            f"{id_key!r} (integer ids), found {found}")
    cells, ids = np.asarray(mat[set_key]).reshape(-1), np.asarray(mat[id_key]).reshape(-1)
    if cells.size == 0 or cells.size != ids.size:
        raise ProtocolError(f"{path}: {set_key!r} has {cells.size} entries and {id_key!r} {ids.size}; expected the "
                            "same non-zero count")
    names = []
    for i, c in enumerate(cells):
        v = np.asarray(c).reshape(-1)
        if v.size != 1 or not isinstance(v[0], str) or not v[0]:
            raise ProtocolError(f"{path}: {set_key}[{i}] is {c!r}; expected one file name string")
        names.append(str(v[0]))
    if ids.dtype.kind not in "iuf" or (ids.dtype.kind == "f" and not np.all(ids == np.round(ids))):
        raise ProtocolError(f"{path}: {id_key!r} must hold integer identity ids, got dtype {ids.dtype}")
    return names, ids.astype(np.int64)


def build_protocol(data_root: str, aligned_dir: str = ALIGNED_DIR, raw_dir: str = RAW_DIR,
                   on_collision: str = "error", mat_dir: str | None = None) -> TinyFaceProtocol:
    """Feature order (sorted aligned files) and probe/gallery rows + labels.

    Set membership and labels come from the protocol ``.mat`` files (``probe_img_ID_pairs.mat``,
    ``gallery_match_img_ID_pairs.mat``) in ``mat_dir`` (default ``<data_root>/tinyface/Testing_Set``)
    when they are there; distractors are always the ``Gallery_Distractor`` files. Without them,
    membership is the files under the raw split (the reference's walk), else the aligned folders.
    """
    aligned_root = io.join(data_root, aligned_dir)
    image_paths = []
    for s in SETS:  # a missing distractor folder is allowed (an empty set)
        image_paths += list_images(io.join(aligned_root, s), required=s != "Gallery_Distractor")
    row_of: dict[str, int] = {}
    for i, p in enumerate(image_paths):
        key = _stem(p)
        if key in row_of and on_collision == "error":
            raise ProtocolError(f"TinyFace file-stem collision: {image_paths[row_of[key]]} and {p} share the key "
                                f"{key!r} (features are matched by stem); pass on_collision='last' for the "
                                "reference's overwrite behaviour")
        row_of[key] = i
    member_root = io.join(data_root, raw_dir)
    if not io.isdir(member_root):
        member_root = aligned_root

    def rows_labels(set_name, distractor=False, root=None):
        rows, labels = [], []
        for p in list_images(io.join(root or member_root, set_name), required=not distractor):
            key = _stem(p)
            if key not in row_of:
                raise ProtocolError(f"{p}: no aligned image with stem {key!r} under {aligned_root}")
            rows.append(row_of[key])
            labels.append(DISTRACTOR_LABEL if distractor else label_of(p))
        return np.asarray(rows, np.int64), np.asarray(labels, np.int64)

    mat_dir = io.join(data_root, raw_dir) if mat_dir is None else mat_dir
    mat_paths = {w: io.join(mat_dir, f[0]) for w, f in MAT_FILES.items()}
    present = [w for w, p in mat_paths.items() if io.isfile(p)]
    if len(present) == 1:
        other = "gallery" if present[0] == "probe" else "probe"
        raise ProtocolError(f"{mat_paths[present[0]]} is present but {mat_paths[other]} is missing; "
                            "the TinyFace protocol needs both .mat files")

    def rows_from_mat(which):
        names, ids = read_protocol_mat(mat_paths[which], which)
        rows = []
        for i, n in enumerate(names):
            key = _stem(n)
            if key not in row_of:
                raise ProtocolError(f"{mat_paths[which]}: entry {i} ({n!r}) has no aligned image with stem {key!r} "
                                    f"under {aligned_root}")
            rows.append(row_of[key])
        return np.asarray(rows, np.int64), ids

    if present:
        p_rows, p_labels = rows_from_mat("probe")
        m_rows, m_labels = rows_from_mat("gallery")
        if np.any(np.isin(m_labels, DISTRACTOR_LABEL)) or np.any(np.isin(p_labels, DISTRACTOR_LABEL)):
            raise ProtocolError(f"{mat_dir}: identity id {DISTRACTOR_LABEL} is reserved for distractors")
    else:
        p_rows, p_labels = rows_labels("Probe")
        m_rows, m_labels = rows_labels("Gallery_Match")
    d_root = member_root
    if present and not io.isdir(io.join(member_root, "Gallery_Distractor")):
        d_root = aligned_root  # only the .mat files next to the aligned copy: distractors from there
    d_rows, d_labels = rows_labels("Gallery_Distractor", distractor=True, root=d_root)
    if p_rows.size == 0:
        raise ProtocolError(f"no probe images under {io.join(member_root, 'Probe')}")
    if m_rows.size + d_rows.size == 0:
        raise ProtocolError(f"empty gallery under {member_root}")
    return TinyFaceProtocol(image_paths, p_rows, p_labels, np.concatenate([m_rows, d_rows]),
                            np.concatenate([m_labels, d_labels]))


def evaluate(features: np.ndarray, protocol: TinyFaceProtocol, ranks=RANKS, tie: str = "stable",
             chunk: int = 4096) -> dict[int, float]:
    """Closed-set CMC: ``{rank: fraction}`` over probes with at least one mate."""
    features = np.asarray(features, np.float32)
    if features.shape[0] != len(protocol.image_paths):
        raise ProtocolError(f"{features.shape[0]} features but {len(protocol.image_paths)} aligned TinyFace images")
    probe = features[protocol.probe_rows]
    gallery = features[protocol.gallery_rows]
    pl, gl = protocol.probe_labels, protocol.gallery_labels
    rk, _, _ = ranking.mate_ranks_chunked(probe, gallery, lambda idx: pl[idx, None] == gl[None, :], tie, chunk)
    return ranking.cmc(rk, ranks)


def drop_rows(protocol: TinyFaceProtocol, bad_rows) -> tuple[TinyFaceProtocol, dict]:
    """Leave the feature rows ``bad_rows`` (e.g. NaN features of failed photos) out of the probe and
    gallery sets; the feature rows keep their positions."""
    bad = np.asarray(bad_rows, np.int64)
    p_ok = ~np.isin(protocol.probe_rows, bad)
    g_ok = ~np.isin(protocol.gallery_rows, bad)
    out = dataclasses.replace(protocol, probe_rows=protocol.probe_rows[p_ok], probe_labels=protocol.probe_labels[p_ok],
                              gallery_rows=protocol.gallery_rows[g_ok], gallery_labels=protocol.gallery_labels[g_ok])
    if out.probe_rows.size == 0 or out.gallery_rows.size == 0:
        raise ProtocolError(f"no {'probe' if out.probe_rows.size == 0 else 'gallery'} image left after leaving out "
                            f"{bad.size} NaN feature rows")
    return out, {"dropped_probes": int((~p_ok).sum()), "dropped_gallery": int((~g_ok).sum())}
