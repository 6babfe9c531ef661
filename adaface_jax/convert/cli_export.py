"""``adaface-jax export SRC OUT.ckpt``: a converted directory or a training workdir -> PyTorch
``{'state_dict': ...}`` (loads into the original net.py with ``strict=True``)."""
from __future__ import annotations

import os
import sys
import tempfile


def add_arguments(parser):
    parser.add_argument("src_dir", help="a converted directory (`adaface-jax convert`) or a training workdir "
                                        "(its latest checkpoint; padded classifier columns are dropped)")
    parser.add_argument("out", help="output .ckpt path, loadable by the original net.py with strict=True")
    parser.add_argument("--no-head", action="store_true", help="write the backbone only")


def export_to_file(src_dir: str, out: str, include_head: bool = True) -> int:
    """Write ``{'state_dict': ...}`` atomically; returns the number of keys."""
    import torch

    from adaface_jax.convert.convert import export_state_dict, load_any, to_torch_state_dict

    if not os.path.isdir(src_dir):
        raise ValueError(f"{src_dir}: expected a converted directory or a training workdir")
    _, variables, head, meta = load_any(src_dir)
    sd = export_state_dict(variables["params"], variables["batch_stats"], head if include_head else None,
                           num_batches_tracked=int(meta.get("num_batches_tracked", 0)))
    out = os.path.abspath(out)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-export-", suffix=".ckpt", dir=os.path.dirname(out))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"state_dict": to_torch_state_dict(sd)}, f)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(sd)


def run(args) -> int:
    try:
        n = export_to_file(args.src_dir, args.out, include_head=not args.no_head)
    except (ValueError, OSError, KeyError) as e:
        print(f"adaface-jax export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.src_dir} -> {args.out} ({n} keys)")
    return 0
