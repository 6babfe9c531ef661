"""ir_101 on MS1MV3 (ms1m-retinaface-t1): 93431 classes, the released AdaFace recipe.

Command (data prepared with ``adaface-jax prepare`` into /data/ms1mv3)::

    adaface-jax train --config configs/ir101_ms1mv3.py --workdir runs/ir101_ms1mv3 \\
        --config.data.data_dir=/data/ms1mv3

Recipe: global batch 512, 26 epochs, LR 0.1 x0.1 at epochs 12/20/24, SGD 0.9, L2 5e-4,
AdaFace m=0.4 h=0.333 s=64 t_alpha=0.01, augmentation probabilities 0.2, bfloat16 compute.
Expected (flip test; HQ numbers there came from fp16 inference, expect +-0.05% in float32):
AdaFace README, R100 MS1MV3: LFW 0.9978, CFP-FP 0.9891, CPLFW 0.9393, CALFW 0.9602, AgeDB 0.9817 (mean 0.9736); IJB-B 95.84, IJB-C 97.09 TAR@FAR=1e-4.
"""
from configs.common import get_base_config


def get_config():
    return get_base_config(arch="ir_101", num_classes=93431)
