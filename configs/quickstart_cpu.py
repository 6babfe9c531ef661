"""The README quickstart: a narrow ir_18 trained with AdaFace on the synthetic identities.

    adaface-jax quickstart --workdir runs/quickstart

(which renders the data, then runs this config through the same ``train`` loop as every recipe).
By hand:

    adaface-jax synthesize runs/qs/data --identities 100 --images-per-identity 24 --val-identities 60 --val-pairs 400
    adaface-jax train --config configs/quickstart_cpu.py --workdir runs/qs/run --config.data.data_dir=runs/qs/data

Not a recipe: ir_18 at width 16 (a quarter of the published channel counts), 4 epochs of 37 steps
at batch 64 on 2,400 images.  About 3-5 minutes on 2 CPU cores.  Expected on held-out synthetic
identities: 10-fold verification accuracy from about 0.75 (untrained) to about 0.95.
"""
from configs.common import get_base_config


def get_config():
    c = get_base_config(arch="ir_18", num_classes=100)
    c.model.width = 16
    c.global_batch_size = 64
    c.epochs = 4
    c.lr = 0.1
    c.lr_milestones = (3,)
    c.precision = "float32"       # bfloat16 convolutions are slow on CPU
    c.log_every = 10
    c.evals.verification.every_epochs = 2
    c.evals.verification.batch_size = 128
    c.evals.verification.sets = ()               # every .bin in the data dir: synthetic_val.bin
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2
    return c
