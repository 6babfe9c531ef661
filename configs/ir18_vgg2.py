"""ir_18 on VGGFace2 (faces_vgg_112x112): 9131 classes, the released AdaFace recipe.

Command (data prepared with ``adaface-jax prepare`` into /data/vgg2)::

    adaface-jax train --config configs/ir18_vgg2.py --workdir runs/ir18_vgg2 \\
        --config.data.data_dir=/data/vgg2

Recipe: global batch 512, 26 epochs, LR 0.1 x0.1 at epochs 12/20/24, SGD 0.9, L2 5e-4,
AdaFace m=0.4 h=0.333 s=64 t_alpha=0.01, augmentation probabilities 0.2, bfloat16 compute.
Expected (flip test; HQ numbers there came from fp16 inference, expect +-0.05% in float32):
AdaFace README, R18 VGGFace2: LFW 0.9947, CFP-FP 0.9713, CPLFW 0.9172, CALFW 0.9390, AgeDB 0.9407 (mean 0.9526); IJB-B 90.67, IJB-C 92.95 TAR@FAR=1e-4.
"""
from configs.common import get_base_config


def get_config():
    return get_base_config(arch="ir_18", num_classes=9131)
