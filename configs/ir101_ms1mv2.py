"""ir_101 on MS1MV2 (faces_emore): 85742 classes, the released AdaFace recipe.

Command (data prepared with ``adaface-jax prepare`` into /data/ms1mv2)::

    adaface-jax train --config configs/ir101_ms1mv2.py --workdir runs/ir101_ms1mv2 \\
        --config.data.data_dir=/data/ms1mv2

Recipe: global batch 512, 26 epochs, LR 0.1 x0.1 at epochs 12/20/24, SGD 0.9, L2 5e-4,
AdaFace m=0.4 h=0.333 s=64 t_alpha=0.01, augmentation probabilities 0.2, bfloat16 compute.
Expected (flip test; HQ numbers there came from fp16 inference, expect +-0.05% in float32):
AdaFace README, R100 MS1MV2: LFW 0.9982, CFP-FP 0.9849, CPLFW 0.9353, CALFW 0.9608, AgeDB 0.9805 (mean 0.9719); IJB-B 95.67, IJB-C 96.89 TAR@FAR=1e-4.
"""
from configs.common import get_base_config


def get_config():
    return get_base_config(arch="ir_101", num_classes=85742)
