"""The released AdaFace recipe as an ml_collections ConfigDict; recipe files override a few fields.

Recipe (scripts/run_ir{50,101}_ms1mv2.sh): global batch 512, 26 epochs, LR 0.1 stepped x0.1 at
epochs 12, 20, 24, SGD momentum 0.9, L2 5e-4 (not on BatchNorm), AdaFace m=0.4 h=0.333 s=64
t_alpha=0.01, crop/low-res/photometric augmentation each with probability 0.2, mixed precision.
"""
import ml_collections


def get_base_config(arch: str = "ir_50", num_classes: int = 85742, data_dir: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.num_classes = num_classes
    c.global_batch_size = 512
    c.accum_steps = 1
    c.epochs = 26
    c.total_steps = 0            # > 0 overrides epochs * steps_per_epoch
    c.lr = 0.1
    c.lr_milestones = (12, 20, 24)
    c.lr_gamma = 0.1
    c.warmup_epochs = 0.0
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.precision = "bfloat16"     # backbone compute: 'float32' | 'bfloat16' | 'float16' (params/head/loss float32)
    c.half_precision = True      # legacy key: False turns precision='bfloat16' into 'float32'; prefer `precision`
    c.per_device_stats = False   # True: BN and AdaFace statistics per device (the original's DDP)
    c.max_skipped_in_row = 20    # stop after this many consecutive non-finite steps (checked at log steps)
    c.log_every = 50
    c.progress = True
    c.sample_grid = True
    c.debug_step_delay_s = 0.0   # sleep after each step: only for tests that interrupt a run
    # CPU backend only: XLA's Eigen convolution kernels and the backbone's CPU backward rewrites, or
    # 'xla_default' (YNNPACK kernels, autodiff's backward)
    c.cpu_convolutions = "eigen"

    c.model = ml_collections.ConfigDict()
    c.model.arch = arch
    c.model.embedding_size = 512
    c.model.width = 64           # first-stage channels; 64 in every released model (narrower: CPU demos)
    c.model.dropout_rate = 0.4

    c.head = ml_collections.ConfigDict()
    c.head.name = "adaface"
    c.head.m = 0.4
    c.head.h = 0.333
    c.head.s = 64.0
    c.head.t_alpha = 0.01
    c.head.sample_rate = 1.0     # Partial FC: < 1 samples this fraction of each device's classes (+ the batch's)

    # Dynamic loss scaling, used only with precision='float16' (torch GradScaler defaults)
    c.loss_scale = ml_collections.ConfigDict()
    c.loss_scale.init = 2.0 ** 16
    c.loss_scale.growth_interval = 2000
    c.loss_scale.growth_factor = 2.0
    c.loss_scale.backoff_factor = 0.5

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfrecord"   # 'random' = noise batches (benchmarks, plumbing tests)
    c.data.data_dir = data_dir
    c.data.num_images = 0        # only for source='random'
    c.data.image_size = 112
    c.data.augment = True
    c.data.crop_prob = 0.2
    c.data.lowres_prob = 0.2
    c.data.photometric_prob = 0.2
    c.data.flip_prob = 0.5
    c.data.num_streams = 64      # logical input streams (gcd with the global batch is used); the process count
                                 # must divide it. Fixes the data order: keep it when resuming on another topology
    c.data.max_bad_records = 100  # undecodable training records replaced before the run stops (see `adaface-jax check`)

    # Evaluators the loop builds once and runs every `every_epochs` (evaluation.evaluators); today the
    # verification sets (.bin), scored with the flip test as the original's validation.
    c.evals = ml_collections.ConfigDict()
    c.evals.verification = ml_collections.ConfigDict()
    c.evals.verification.every_epochs = 1      # 0 disables it
    c.evals.verification.sets = ("lfw", "cfp_fp", "cplfw", "agedb_30", "calfw")
    c.evals.verification.bin_dir = ""          # defaults to the data dir
    c.evals.verification.batch_size = 256
    c.evals.verification.max_pairs = 0         # > 0: first N pairs only (smoke runs)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 2000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    return c
