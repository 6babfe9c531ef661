"""PyTorch AdaFace checkpoints <-> Flax variables, and the converted-checkpoint directory.

A converted directory holds

    OUT_DIR/checkpoint/          orbax (StandardCheckpointer) of {'params', 'batch_stats'[, 'head']}
    OUT_DIR/adaface_meta.json    arch, input size, channel order, normalisation, embedding size, ...

with ``head = {'kernel': (512, C)[, 'batch_mean': (1,), 'batch_std': (1,)]}``.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from adaface_jax import io
from adaface_jax.convert import mapping
from adaface_jax.convert.safe_load import import_torch, read_torch_checkpoint
from adaface_jax.errors import InputError
from adaface_jax.models import ARCHS, build_model

META_NAME = "adaface_meta.json"
CKPT_NAME = "checkpoint"
FORMAT_VERSION = 1


class CheckpointMismatchError(InputError):
    """The state_dict does not match the architecture; the message lists every offending key."""

    def __init__(self, arch, missing=(), unexpected=(), shape_mismatch=(), hint=""):
        self.missing, self.unexpected, self.shape_mismatch = list(missing), list(unexpected), list(shape_mismatch)
        lines = [f"checkpoint does not match {arch}:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.shape_mismatch:
            lines.append(f"  shape mismatches ({len(self.shape_mismatch)}): " + ", ".join(
                f"{k} has {tuple(got)}, expected {tuple(want)}" for k, got, want in self.shape_mismatch))
        if hint:
            lines.append("  " + hint)
        super().__init__("\n".join(lines))


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch here
        return v.detach().cpu().numpy()
    return np.asarray(v)


def extract_state_dict(obj, source: str = "checkpoint") -> dict:
    """The state_dict inside a loaded checkpoint: ``{'state_dict': ...}`` (released / Lightning) or a
    bare state_dict."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]
    elif isinstance(obj, Mapping) and obj and all(hasattr(v, "shape") for v in obj.values()):
        sd = obj
    else:
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise InputError(f"{source}: no 'state_dict' found (top level: {keys})")
    return dict(sd)


def split_state_dict(sd: Mapping) -> tuple[dict, dict, dict]:
    """-> (backbone keys without 'model.', head keys without 'head.', others)."""
    model, head, other = {}, {}, {}
    has_prefix = any(k.startswith(mapping.MODEL_PREFIX) for k in sd)
    for k, v in sd.items():
        if k.startswith(mapping.MODEL_PREFIX):
            model[k[len(mapping.MODEL_PREFIX):]] = v
        elif k.startswith(mapping.HEAD_PREFIX):
            head[k[len(mapping.HEAD_PREFIX):]] = v
        elif not has_prefix and k.split(".")[0] in ("input_layer", "body", "output_layer"):
            model[k] = v  # a bare backbone state_dict
        else:
            other[k] = v
    return model, head, other


def flax_shapes(arch: str, input_size: int = 112) -> dict:
    """{'params', 'batch_stats'} of ``arch`` as ShapeDtypeStructs (no compute)."""


    model = build_model(arch, input_size=input_size)
    x = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


def _leaves(tree: Mapping, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def state_dict_to_variables(sd: Mapping, arch: Optional[str] = None, input_size: Optional[int] = None):
    """Strictly map a PyTorch state_dict (model.* and optional head.* keys) to Flax.

    Returns ``(arch, input_size, variables, head, extras)`` with ``variables = {'params',
    'batch_stats'}`` of numpy float32 arrays, ``head`` a dict or None and ``extras`` the information
    dropped on the way (``num_batches_tracked``).  Any missing, unexpected or mis-shaped key raises
    ONE ``CheckpointMismatchError`` naming all of them.
    """
    model_sd, head_sd, other = split_state_dict(sd)
    shapes = {k: tuple(np.shape(v)) for k, v in model_sd.items()}
    inferred = None
    try:
        inferred = mapping.infer_arch(shapes)
    except ValueError as e:
        if arch is None:
            raise InputError(f"{e}; pass arch= explicitly") from None
    arch = arch or inferred[0]
    input_size = input_size or (inferred[1] if inferred else 112)

    if arch not in ARCHS:
        raise InputError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    target = flax_shapes(arch, input_size)
    geometry = mapping.dense_geometry(target["params"])

    expected = {}  # torch key (no prefix) -> (collection, path, kind, flax shape)
    for coll in ("params", "batch_stats"):
        for path, leaf in _leaves(target[coll]):
            key = mapping.flax_leaf_to_torch_key(coll, path)
            shape = tuple(leaf.shape)
            expected[key] = (coll, path, mapping.leaf_kind(coll, path, shape), shape)
    bn_counters = {mapping.flax_module_to_torch(p) + ".num_batches_tracked"
                   for p in mapping.bn_modules(target["batch_stats"])}

    variables = {"params": {}, "batch_stats": {}}
    missing, unexpected, mismatch = [], [], []
    counts = []
    for key, value in model_sd.items():
        if key in bn_counters:
            counts.append(int(_to_numpy(value).reshape(-1)[0]) if np.size(_to_numpy(value)) else 0)
            continue
        if key not in expected:
            unexpected.append(mapping.MODEL_PREFIX + key)
            continue
        coll, path, kind, fshape = expected[key]
        want = mapping.torch_shape(kind, fshape)
        if shapes[key] != want:
            mismatch.append((mapping.MODEL_PREFIX + key, shapes[key], want))
            continue
        w = _to_numpy(value).astype(np.float32)
        _set(variables[coll], path, mapping.torch_to_flax_value(kind, w, geometry))
    missing = [mapping.MODEL_PREFIX + k for k in expected if k not in model_sd]

    head = None
    if head_sd:
        head = {}
        allowed = {"kernel": None, "batch_mean": (1,), "batch_std": (1,), "t": (1,)}
        for key, value in head_sd.items():
            if key not in allowed:
                unexpected.append(mapping.HEAD_PREFIX + key)
                continue
            v = _to_numpy(value).astype(np.float32)
            emb = target["params"]["output_layer_3"]["kernel"].shape[1]
            want = allowed[key] or (emb, v.shape[1] if v.ndim == 2 else -1)
            if v.shape != tuple(want):
                mismatch.append((mapping.HEAD_PREFIX + key, v.shape, want))
            elif key != "t":
                head[key] = v
        if "kernel" not in head_sd:
            missing.append(mapping.HEAD_PREFIX + "kernel")
        if ("batch_mean" in head_sd) != ("batch_std" in head_sd):
            missing.append(mapping.HEAD_PREFIX + ("batch_std" if "batch_mean" in head_sd else "batch_mean"))
    unexpected.extend(sorted(other))

    if missing or unexpected or mismatch:
        hint = ""
        if inferred and inferred != (arch, input_size):
            hint = f"(the keys look like {inferred[0]} at {inferred[1]}x{inferred[1]}; omit --arch to infer it)"
        raise CheckpointMismatchError(arch, missing, unexpected, mismatch, hint)
    extras = {"num_batches_tracked": max(counts) if counts else 0}
    return arch, input_size, variables, head, extras


def export_state_dict(params: Mapping, batch_stats: Mapping, head: Optional[Mapping] = None, *,
                      num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """Flax variables (+ optional head) -> ``{'model.*': ..., 'head.*': ...}`` numpy arrays that the
    original PyTorch architecture loads with ``strict=True``.

    ``head`` is ``{'kernel'[, 'batch_mean', 'batch_std']}`` or ``{'kernel', 'state': AdaFaceState}``;
    with AdaFace statistics the unused ``head.t`` buffer is written as zeros(1).
    """
    geometry = mapping.dense_geometry(params)
    out: dict[str, np.ndarray] = {}
    for coll, tree in (("params", params), ("batch_stats", batch_stats)):
        for path, leaf in _leaves(tree):
            v = np.asarray(leaf, dtype=np.float32)
            kind = mapping.leaf_kind(coll, path, v.shape)
            out[mapping.MODEL_PREFIX + mapping.flax_leaf_to_torch_key(coll, path)] = \
                mapping.flax_to_torch_value(kind, v, geometry)
    for path in mapping.bn_modules(batch_stats):
        out[f"{mapping.MODEL_PREFIX}{mapping.flax_module_to_torch(path)}.num_batches_tracked"] = \
            np.asarray(num_batches_tracked, dtype=np.int64)
    if head is not None:
        head = dict(head)
        state = head.pop("state", None)
        if state is not None and hasattr(state, "batch_mean"):
            head.update(batch_mean=state.batch_mean, batch_std=state.batch_std)
        out[mapping.HEAD_PREFIX + "kernel"] = np.asarray(head["kernel"], dtype=np.float32)
        if "batch_mean" in head:
            out[mapping.HEAD_PREFIX + "t"] = np.zeros((1,), np.float32)
            for k in mapping.HEAD_STATE_KEYS:
                out[mapping.HEAD_PREFIX + k] = np.asarray(head[k], dtype=np.float32).reshape(1)
    return out


def to_torch_state_dict(sd: Mapping[str, np.ndarray]):
    """numpy state_dict -> OrderedDict of torch tensors (imports torch)."""
    torch = import_torch()
    return collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in sd.items())


# ---------------------------------------------------------------------------------------------
# The converted directory


def sha256_of(path: str) -> str:
    """sha256 of a local or ``gs://`` file."""
    h = hashlib.sha256()
    with io.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_meta(arch: str, input_size: int, variables: Mapping, head: Optional[Mapping], **extra) -> dict:
    if "output_layer_3" in variables["params"]:
        emb = int(np.shape(variables["params"]["output_layer_3"]["kernel"])[1])
    else:  # another backbone (the 'tiny' test arch): the head's embedding side, if any
        emb = int(np.shape(head["kernel"])[0]) if head and "kernel" in head else None
    meta = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "input_size": [input_size, input_size],
        "layout": "NHWC",
        "channel_order": "BGR",
        "normalization": "(x/255 - 0.5) / 0.5",
        "embedding_size": emb,
        "head_num_classes": int(np.shape(head["kernel"])[1]) if head else None,
        "head_has_adaface_state": bool(head and "batch_mean" in head),
    }
    meta.update(extra)
    return meta


def check_converted_target(out_dir: str, force: bool = False) -> tuple:
    """-> (canonical ``out_dir``, whether it holds an earlier converted checkpoint). Refuses a path that is
    not a folder, an earlier output without ``force``, and a ``checkpoint`` entry that is not part of an
    earlier output (never replaced)."""
    out_dir = io.check_output_dir(out_dir, "output directory")
    ckpt_dir, meta_path = io.join(out_dir, CKPT_NAME), io.join(out_dir, META_NAME)
    earlier = io.exists(ckpt_dir) or io.exists(meta_path)
    if earlier:
        if not force:
            raise FileExistsError(f"{out_dir} already holds a converted checkpoint (use --force to overwrite)")
        if not io.isfile(meta_path) or (io.exists(ckpt_dir) and not io.isdir(ckpt_dir)):
            raise InputError(f"{out_dir}: its '{CKPT_NAME}' is not part of an earlier converted checkpoint (no "
                             f"{META_NAME} beside a {CKPT_NAME}/ folder); refusing to replace it")
    return out_dir, earlier


def save_converted(out_dir: str, arch: str, input_size: int, variables: Mapping, head: Optional[Mapping] = None,
                   meta_extra: Optional[dict] = None, force: bool = False) -> dict:
    """Write ``out_dir/checkpoint`` (orbax) and ``out_dir/adaface_meta.json`` (a local folder or ``gs://``);
    returns the meta.

    The output is built in a local temporary folder and then copied in, ``adaface_meta.json`` last: a
    folder is a converted checkpoint only once its meta file is there, so a crash never leaves one that
    looks finished. ``force`` replaces an earlier converted checkpoint (its meta file goes first);
    other files in ``out_dir`` are never touched."""
    out_dir, earlier = check_converted_target(out_dir, force)
    ckpt_dir, meta_path = io.join(out_dir, CKPT_NAME), io.join(out_dir, META_NAME)
    tree = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    if head:
        tree["head"] = {k: np.asarray(v, np.float32) for k, v in head.items()}
    tmp = tempfile.mkdtemp(prefix="adaface-convert-")  # a local staging folder (orbax writes it)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, CKPT_NAME), tree)
        ckptr.wait_until_finished()
        ckptr.close()
        meta = make_meta(arch, input_size, variables, head, **(meta_extra or {}))
        io.write_text(os.path.join(tmp, META_NAME), json.dumps(meta, indent=2, sort_keys=True))
        if earlier:  # no longer a finished output while the new one is copied in
            io.remove(meta_path)
            io.rmtree(ckpt_dir)
        io.publish_dir(tmp, out_dir, last=(META_NAME,))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def convert_checkpoint(src: str, out_dir: str, arch: Optional[str] = None, force: bool = False) -> dict:
    """``.ckpt`` (local or ``gs://``) -> converted directory (local or ``gs://``); returns the written meta."""
    src = io.check_path(src, "checkpoint")
    arch, input_size, variables, head, extras = map_torch_file(src, arch)
    meta_extra = {"source": io.basename(src), "source_sha256": sha256_of(src), **extras}
    return save_converted(out_dir, arch, input_size, variables, head, meta_extra, force=force)


def map_torch_file(path: str, arch: Optional[str] = None):
    """A PyTorch ``.ckpt`` read safely and mapped strictly: ``state_dict_to_variables``'s result, with
    the file name in front of any error message (the error keeps its type)."""
    sd = extract_state_dict(read_torch_checkpoint(path), path)
    try:
        return state_dict_to_variables(sd, arch)
    except ValueError as e:
        e.args = (f"{path}: {e.args[0] if e.args else e}",) + e.args[1:]
        raise
