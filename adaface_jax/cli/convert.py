"""``adaface-jax convert IN.ckpt OUT_DIR [--arch ir_50]``: PyTorch .ckpt -> orbax + JSON meta. Either path may
be local or a ``gs://`` URL; the meta file is written last."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("src", help="PyTorch checkpoint (released {'state_dict': ...} or a Lightning .ckpt)")
    parser.add_argument("out_dir", help="output directory (orbax checkpoint/ + adaface_meta.json)")
    parser.add_argument("--arch", default=None, help="ir_18 ... ir_se_200; inferred from the keys if omitted")
    parser.add_argument("--force", action="store_true", help="overwrite an existing converted checkpoint")


def run(args) -> int:
    from adaface_jax.convert.convert import convert_checkpoint
    from adaface_jax.io import check_creatable_dir, check_path

    src = check_path(args.src, "checkpoint")
    out_dir = check_creatable_dir(args.out_dir, "output directory")
    meta = convert_checkpoint(src, out_dir, arch=args.arch, force=args.force)
    head = f", head with {meta['head_num_classes']} classes" if meta["head_num_classes"] else ""
    print(f"converted {args.src} -> {args.out_dir}: {meta['arch']} {meta['input_size'][0]}x"
          f"{meta['input_size'][1]} {meta['channel_order']}{head}")
    return 0
