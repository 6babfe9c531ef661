"""ir_50 on MS1MV3 (ms1m-retinaface-t1): 93431 classes, the released AdaFace recipe.

Command (data prepared with ``adaface-jax prepare`` into /data/ms1mv3)::

    adaface-jax train --config configs/ir50_ms1mv3.py --workdir runs/ir50_ms1mv3 \\
        --config.data.data_dir=/data/ms1mv3

Recipe: global batch 512, 26 epochs, LR 0.1 x0.1 at epochs 12/20/24, SGD 0.9, L2 5e-4,
AdaFace m=0.4 h=0.333 s=64 t_alpha=0.01, augmentation probabilities 0.2, bfloat16 compute.
Expected (flip test; HQ numbers there came from fp16 inference, expect +-0.05% in float32):
No released R50 MS1MV3 model; the R50 MS1MV2 numbers (HQ mean 0.9688, IJB-C 96.27) are a lower guide.
"""
from configs.common import get_base_config


def get_config():
    return get_base_config(arch="ir_50", num_classes=93431)
