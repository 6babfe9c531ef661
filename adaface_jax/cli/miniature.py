"""``adaface-jax miniature``: the paper in miniature -- AdaFace, ArcFace and CosFace trained on the same
batches from the same seeds, measured on held-out identities by image quality (``adaface_jax.miniature``)."""
from __future__ import annotations

CONFIG_OVERRIDES = True


def add_arguments(parser):
    parser.add_argument("--out", default="runs/miniature",
                        help="a folder or a gs:// URL: runs/, study.json, table.md, the PNGs and (last) summary.json "
                             "are written here; a re-run resumes")
    parser.add_argument("--config", default=None,
                        help="default configs/paper_miniature.py (the full setting); "
                             "configs/paper_miniature.py:small runs in minutes; --config.x=y overrides follow")
    parser.add_argument("--yale-b", default=None, metavar="DIR",
                        help="the cropped Extended Yale B folder, local or gs:// (yaleBNN/yaleBNN_P00A+000E+00.jpg "
                             "...); without it only the synthetic identities are used")


def run(args) -> int:
    import os

    from adaface_jax import io
    from adaface_jax.errors import InputError
    from adaface_jax.miniature import run_study
    from adaface_jax.miniature.report import paired_text, summarize, table_markdown, write_report
    from adaface_jax.train.config_io import apply_overrides, load_config

    out = io.check_creatable_dir(args.out, "--out")  # refused (one line) before anything is made
    yale_b = None
    if args.yale_b is not None:
        yale_b = io.check_path(args.yale_b, "--yale-b")
        if not io.isdir(yale_b):
            raise InputError(f"--yale-b {args.yale_b}: not a folder; expected the cropped Extended Yale B root")
    path = args.config or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                       "configs", "paper_miniature.py")
    config = apply_overrides(load_config(path), args.overrides)
    if "study" not in config:
        raise InputError(f"--config {path}: has no 'study' section; expected configs/paper_miniature.py or a copy")
    if args.yale_b is None and "yale_b" in config.study.datasets:
        print("no --yale-b folder: running the synthetic identities only", flush=True)
    result = run_study(config, out, yale_b_dir=yale_b)
    paths = write_report(result, out)
    summary = summarize(result)
    print(table_markdown(summary) + "\n" + paired_text(summary), end="")
    trained = len(result["runs"]) - result["resumed_runs"]
    print(f"{trained} runs trained in {result['runtime_s'] / 60:.1f} min, {result['resumed_runs']} read from earlier "
          f"records; report: {paths['table']}, {paths['overview']}", flush=True)
    return 0
