"""The paper in miniature: AdaFace's two claims (Kim, Jain, Liu, CVPR 2022) checked on a CPU against ArcFace
and CosFace -- the feature norm tracks image quality, and the quality-adaptive margin helps most on
low-quality pairs.  ``run_study(config, out_dir)`` trains and measures (``runner``); ``summarize`` and
``write_report`` turn the runs into the table and the plots (``report``).  Settings: configs/paper_miniature.py;
command: ``adaface-jax miniature``; notebook: notebooks/04_paper_in_miniature.ipynb."""
from adaface_jax.miniature.runner import run_study

__all__ = ["run_study"]
