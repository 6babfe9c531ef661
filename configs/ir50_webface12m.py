"""ir_50 on WebFace12M: 617970 classes, the released AdaFace recipe.

Command (data prepared with ``adaface-jax prepare`` into /data/webface12m)::

    adaface-jax train --config configs/ir50_webface12m.py --workdir runs/ir50_webface12m \\
        --config.data.data_dir=/data/webface12m

Recipe: global batch 512, 26 epochs, LR 0.1 x0.1 at epochs 12/20/24, SGD 0.9, L2 5e-4,
AdaFace m=0.4 h=0.333 s=64 t_alpha=0.01, augmentation probabilities 0.2, bfloat16 compute.
Expected (flip test; HQ numbers there came from fp16 inference, expect +-0.05% in float32):
No released R50 WebFace12M model; the R50 WebFace4M numbers (HQ mean 0.9734, IJB-C 96.98) are a lower guide.
"""
from configs.common import get_base_config


def get_config():
    return get_base_config(arch="ir_50", num_classes=617970)
