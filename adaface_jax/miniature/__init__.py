"""The paper in miniature: AdaFace's two claims (Kim, Jain, Liu, CVPR 2022) checked on a CPU -- the feature norm
is a proxy for image quality, better than the probability of the true class, and the quality-adaptive margin
helps on low-quality probes -- against CosFace and ArcFace, with an oracle AdaFace (margin from the true
quality) as a positive control.

``data``: shape-only synthetic identities, batches with hard degraded rows; ``runner.run_study(config, out_dir)``
trains and measures every arm and seed; ``mechanism``: the margin scaler and gradient scale per sample;
``stats``: the paired tests; ``report``: verdicts, text, table and plots. Settings and endpoints:
configs/paper_miniature.py; command: ``adaface-jax miniature``; notebook: notebooks/04_paper_in_miniature.ipynb;
design and findings: docs/miniature.md."""
from adaface_jax.miniature.runner import run_study

__all__ = ["run_study"]
