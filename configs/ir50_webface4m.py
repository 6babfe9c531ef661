"""ir_50 on WebFace4M: 205990 classes, the released AdaFace recipe.

Command (data prepared with ``adaface-jax prepare`` into /data/webface4m)::

    adaface-jax train --config configs/ir50_webface4m.py --workdir runs/ir50_webface4m \\
        --config.data.data_dir=/data/webface4m

Recipe: global batch 512, 26 epochs, LR 0.1 x0.1 at epochs 12/20/24, SGD 0.9, L2 5e-4,
AdaFace m=0.4 h=0.333 s=64 t_alpha=0.01, augmentation probabilities 0.2, bfloat16 compute.
Expected (flip test; HQ numbers there came from fp16 inference, expect +-0.05% in float32):
AdaFace README, R50 WebFace4M: LFW 0.9978, CFP-FP 0.9897, CPLFW 0.9417, CALFW 0.9598, AgeDB 0.9778 (mean 0.9734); IJB-B 95.44, IJB-C 96.98 TAR@FAR=1e-4.
"""
from configs.common import get_base_config


def get_config():
    return get_base_config(arch="ir_50", num_classes=205990)
