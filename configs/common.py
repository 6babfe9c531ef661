"""The released AdaFace recipe: ``adaface_jax.train.config.default_config()`` holds its values (global batch
512, 26 epochs, LR 0.1 stepped x0.1 at epochs 12, 20, 24, SGD momentum 0.9, L2 5e-4 not on BatchNorm, AdaFace
m=0.4 h=0.333 s=64 t_alpha=0.01, crop/low-res/photometric augmentation each with probability 0.2, bfloat16
compute; scripts/run_ir{50,101}_ms1mv2.sh of the original). A recipe file names its backbone and dataset here
and overrides what else differs.
"""
import ml_collections

from adaface_jax.train.config import default_config


def get_base_config(arch: str = "ir_50", num_classes: int = 85742, data_dir: str = "") -> ml_collections.ConfigDict:
    c = default_config()
    c.model.arch = arch
    c.num_classes = num_classes
    c.data.data_dir = data_dir
    return c
