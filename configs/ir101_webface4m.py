"""ir_101 on WebFace4M: 205990 classes, the released AdaFace recipe.

Command (data prepared with ``adaface-jax prepare`` into /data/webface4m)::

    adaface-jax train --config configs/ir101_webface4m.py --workdir runs/ir101_webface4m \\
        --config.data.data_dir=/data/webface4m

Recipe: global batch 512, 26 epochs, LR 0.1 x0.1 at epochs 12/20/24, SGD 0.9, L2 5e-4,
AdaFace m=0.4 h=0.333 s=64 t_alpha=0.01, augmentation probabilities 0.2, bfloat16 compute.
Expected (flip test, from the paper/README, numbers quoted from memory -- check the upstream
table before relying on them): HQ 5-set mean about 97.5; IJB-C TAR@FAR=1e-4 about 97.4 (AdaFace paper).
"""
from configs.common import get_base_config


def get_config():
    return get_base_config(arch="ir_101", num_classes=205990)
