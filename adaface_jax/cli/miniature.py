"""``adaface-jax miniature``: the paper in miniature -- AdaFace, CosFace, ArcFace and an oracle AdaFace trained
on the same batches from the same seeds, with hard low-quality samples, scored on held-out identities against
endpoints fixed in the config (``adaface_jax.miniature``, docs/miniature.md)."""
from __future__ import annotations

CONFIG_OVERRIDES = True


def add_arguments(parser):
    parser.add_argument("--out", default="runs/miniature",
                        help="a folder or a gs:// URL: runs/, study.json, findings.md, table.md, the PNGs and (last) "
                             "summary.json are written here; a re-run resumes")
    parser.add_argument("--config", default=None,
                        help="default configs/paper_miniature.py (the full setting, ~40 min on 2 CPU cores); "
                             "configs/paper_miniature.py:small runs in minutes; --config.x=y overrides follow")


def run(args) -> int:
    import os

    from adaface_jax import io
    from adaface_jax.miniature import run_study
    from adaface_jax.miniature.report import summarize, table_markdown, write_report
    from adaface_jax.train.config import apply_overrides, load_config

    out = io.check_creatable_dir(args.out, "--out")  # refused (one line) before anything is made
    path = args.config or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                       "configs", "paper_miniature.py")
    config = apply_overrides(load_config(path), args.overrides)
    result = run_study(config, out)
    summary = summarize(result)
    paths = write_report(result, out, summary)
    print(summary["text"] + "\n" + table_markdown(summary, float(config.study.far)), end="")
    trained = len(result["runs"]) - result["resumed_runs"]
    print(f"{trained} runs trained in {result['runtime_s'] / 60:.1f} min, {result['resumed_runs']} read from earlier "
          f"records; report: {paths['findings']}, {paths['table']}, {paths['overview']}", flush=True)
    return 0
