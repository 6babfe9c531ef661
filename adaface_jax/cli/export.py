"""``adaface-jax export SRC OUT.ckpt``: a converted directory, a released ``.ckpt`` or a training workdir
-> PyTorch ``{'state_dict': ...}`` (loads into the original net.py with ``strict=True``)."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("src_dir", help="a converted directory (`adaface-jax convert`), a released .ckpt or a training "
                                        "workdir (its latest checkpoint; padded classifier columns are dropped)")
    parser.add_argument("out", help="output .ckpt path, loadable by the original net.py with strict=True")
    parser.add_argument("--no-head", action="store_true", help="write the backbone only")


def export_to_file(src: str, out: str, include_head: bool = True) -> int:
    """Write ``{'state_dict': ...}`` atomically; returns the number of keys."""
    import torch

    from adaface_jax.convert.convert import export_state_dict, load_any, to_torch_state_dict
    from adaface_jax.io import atomic_write, check_output_file

    out = check_output_file(out)
    _, variables, head, meta = load_any(src)
    sd = export_state_dict(variables["params"], variables["batch_stats"], head if include_head else None,
                           num_batches_tracked=int(meta.get("num_batches_tracked", 0)))
    with atomic_write(out) as f:
        torch.save({"state_dict": to_torch_state_dict(sd)}, f)
    return len(sd)


def run(args) -> int:
    n = export_to_file(args.src_dir, args.out, include_head=not args.no_head)
    print(f"exported {args.src_dir} -> {args.out} ({n} keys)")
    return 0
