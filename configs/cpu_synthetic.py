"""Tiny ir_18 run on the synthetic identity dataset: a few minutes on 2 CPU cores.

    adaface-jax synthesize /tmp/synth --identities 16 --images-per-identity 16 --val-pairs 100
    adaface-jax train --config configs/cpu_synthetic.py --workdir /tmp/run --config.data.data_dir=/tmp/synth

Not a recipe: it proves the whole loop (input, step, checkpoints, validation on any .bin in the data
dir, logs) on a laptop.  The loss should fall over the run; accuracies mean little at this size.
"""
from configs.common import get_base_config


def get_config():
    c = get_base_config(arch="ir_18", num_classes=16)
    c.global_batch_size = 16
    c.epochs = 2
    c.lr = 0.05
    c.lr_milestones = (1,)
    c.precision = "float32"       # bfloat16 convs are slow on CPU
    c.log_every = 1
    c.evals.verification.every_epochs = 1
    c.evals.verification.batch_size = 32
    c.evals.verification.max_pairs = 100
    c.evals.verification.sets = ()               # every .bin in the data dir (synthesize writes synthetic_val.bin)
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    return c
