"""ir_50 on CASIA-WebFace (faces_webface_112x112): 10572 classes, the released AdaFace recipe.

Command (data prepared with ``adaface-jax prepare`` into /data/casia)::

    adaface-jax train --config configs/ir50_casia.py --workdir runs/ir50_casia \\
        --config.data.data_dir=/data/casia

Recipe: global batch 512, 26 epochs, LR 0.1 x0.1 at epochs 12/20/24, SGD 0.9, L2 5e-4,
AdaFace m=0.4 h=0.333 s=64 t_alpha=0.01, augmentation probabilities 0.2, bfloat16 compute.
Expected (flip test; HQ numbers there came from fp16 inference, expect +-0.05% in float32):
AdaFace README, R50 CASIA-WebFace: LFW 0.9942, CFP-FP 0.9641, CPLFW 0.8997, CALFW 0.9323, AgeDB 0.9438 (mean 0.9468).
"""
from configs.common import get_base_config


def get_config():
    return get_base_config(arch="ir_50", num_classes=10572)
