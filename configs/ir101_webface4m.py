"""ir_101 on WebFace4M: 205990 classes, the released AdaFace recipe.

Command (data prepared with ``adaface-jax prepare`` into /data/webface4m)::

    adaface-jax train --config configs/ir101_webface4m.py --workdir runs/ir101_webface4m \\
        --config.data.data_dir=/data/webface4m

Recipe: global batch 512, 26 epochs, LR 0.1 x0.1 at epochs 12/20/24, SGD 0.9, L2 5e-4,
AdaFace m=0.4 h=0.333 s=64 t_alpha=0.01, augmentation probabilities 0.2, bfloat16 compute.
Expected (flip test; HQ numbers there came from fp16 inference, expect +-0.05% in float32):
AdaFace README, R100 WebFace4M: LFW 0.9980, CFP-FP 0.9917, CPLFW 0.9463, CALFW 0.9605, AgeDB 0.9790 (mean 0.9751); IJB-B 96.03, IJB-C 97.39 TAR@FAR=1e-4; IJB-S Sur-to-Single rank-1 70.42.
"""
from configs.common import get_base_config


def get_config():
    return get_base_config(arch="ir_101", num_classes=205990)
