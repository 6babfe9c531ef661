"""ir_101 on WebFace12M: 617970 classes, the released AdaFace recipe.

Command (data prepared with ``adaface-jax prepare`` into /data/webface12m)::

    adaface-jax train --config configs/ir101_webface12m.py --workdir runs/ir101_webface12m \\
        --config.data.data_dir=/data/webface12m

Recipe: global batch 512, 26 epochs, LR 0.1 x0.1 at epochs 12/20/24, SGD 0.9, L2 5e-4,
AdaFace m=0.4 h=0.333 s=64 t_alpha=0.01, augmentation probabilities 0.2, bfloat16 compute.
Expected (flip test; HQ numbers there came from fp16 inference, expect +-0.05% in float32):
AdaFace README, R100 WebFace12M: LFW 0.9982, CFP-FP 0.9926, CPLFW 0.9457, CALFW 0.9612, AgeDB 0.9800 (mean 0.9755); IJB-B 96.41, IJB-C 97.66 TAR@FAR=1e-4; IJB-S Sur-to-Single/Book/Sur rank-1 71.35/71.93/36.71; TinyFace rank-1 72.29.
"""
from configs.common import get_base_config


def get_config():
    return get_base_config(arch="ir_101", num_classes=617970)
