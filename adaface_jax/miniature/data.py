"""The study's data, in memory: synthetic identities told apart by shape alone (``appearance='grey_shape'``),
the training batches with a fixed share of rows degraded afresh at every step, and the held-out sets.

Every random choice is keyed: a batch's rows and flips by (seed, step), which rows are degraded by
(seed, step), and each degraded row's resolution, noise and occluder by (seed, step, row). So every arm of
the study sees the same batches for a seed, and the test sets are the same for every run.

Quality is a label defined from a degradation's parameters, 1 for an untouched image and lower the harder
it is: ``quality(side, noise_std, occluded, size)`` below.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from adaface_jax.errors import ConfigError
from data_pipeline import synthetic
from data_pipeline.pixels import normalize_pixels

# quality = 1 - severity, severity a weighted sum of three parts, each in [0, 1]:
RESOLUTION_FLOOR_PX = 4    # the side at which nothing of a face is left (resolution part 1)
NOISE_CEILING = 50.0       # noise std, in grey levels, at which the noise part is 1
SEVERITY_WEIGHTS = {"resolution": 0.6, "noise": 0.25, "occluder": 0.15}
PROBE_BATCH_STEP = 1 << 40  # the key of the fixed probe batch: no training step reaches it
DEGRADED, CLEAN = "degraded", "clean"  # the probe groups


def quality(side, noise_std, occluded, size: int):
    """1 - severity of a degradation: ``side`` px (log scale from ``size``, no loss, to 4 px, all lost), noise
    std (linear to 50 grey levels) and an occluder (0 or 1), weighted 0.6 / 0.25 / 0.15."""
    side = np.asarray(side, np.float64)
    resolution = np.clip(np.log(size / side) / math.log(size / RESOLUTION_FLOOR_PX), 0.0, 1.0)
    noise = np.clip(np.asarray(noise_std, np.float64) / NOISE_CEILING, 0.0, 1.0)
    w = SEVERITY_WEIGHTS
    return 1.0 - (w["resolution"] * resolution + w["noise"] * noise + w["occluder"] * np.asarray(occluded, float))


def draw_degradation(rng: np.random.Generator, spec, size: int) -> dict:
    """One degradation from ``spec`` (side: (lo, hi) px, drawn log-uniform and rounded; noise: (lo, hi) std,
    uniform; occluder_prob: a grey rectangle 25-50% of the size on each side, somewhere on the face)."""
    lo, hi = (int(x) for x in spec.side)
    side = int(np.clip(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))), lo, hi))
    noise_std = float(rng.uniform(*spec.noise))
    occluder = None
    if rng.random() < float(spec.occluder_prob):
        w, h = rng.uniform(0.25, 0.5, 2)
        x0, y0 = rng.uniform(0.1, 0.9 - w), rng.uniform(0.15, 0.9 - h)
        occluder = (x0, y0, x0 + w, y0 + h, float(rng.uniform(0, 255)))
    return {"side": side, "noise_std": noise_std, "occluder": occluder,
            "quality": float(quality(side, noise_std, occluder is not None, size))}


def degrade(image: np.ndarray, rng: np.random.Generator, spec) -> tuple[np.ndarray, float]:
    """``image`` degraded by a draw from ``spec`` (the noise from ``rng`` too) -> (uint8 image, quality)."""
    d = draw_degradation(rng, spec, image.shape[0])
    return synthetic.low_quality(image, d["side"], d["noise_std"], d["occluder"], rng), d["quality"]


@dataclasses.dataclass(frozen=True)
class StudyData:
    """uint8 BGR images (N, S, S, 3) with int32 labels.

    train: clean renders of the training identities (labels 0..classes-1), degraded online in batches;
    gallery: one clean image of each held-out identity; probes: other images of the held-out identities,
    ``probe_groups`` 'degraded' (recognisable but hard) or 'clean', with their ``probe_quality``;
    claim1: unseen images of the training identities with degradations spread over the quality range
    (labels are training classes, so the probability of the true class is defined)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    gallery_images: np.ndarray
    gallery_labels: np.ndarray
    probe_images: np.ndarray
    probe_labels: np.ndarray
    probe_quality: np.ndarray
    probe_groups: np.ndarray
    claim1_images: np.ndarray
    claim1_labels: np.ndarray
    claim1_quality: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.train_labels.max()) + 1

    def arrays(self):
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


def _degraded_copies(images, labels, spec, keys) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out, qualities = np.empty_like(images), np.empty(len(images), np.float32)
    for k, key in enumerate(keys):
        out[k], qualities[k] = degrade(images[k], np.random.default_rng(key), spec)
    return out, labels, qualities


def build_study_data(study, image_size: int) -> StudyData:
    """The training identities 0..N-1 and held-out identities from ``synthetic.HELD_OUT_OFFSET``, all rendered
    with ``study.data_seed`` (the same data for every run)."""
    seed, per_id = int(study.data_seed), int(study.train_images_per_identity)
    render = dict(seed=seed, size=image_size, severity="none", appearance="grey_shape")
    train_ids = range(int(study.train_identities))
    train_images, train_labels, _ = synthetic.render_arrays(train_ids, per_id, **render)

    test_ids = range(synthetic.HELD_OUT_OFFSET, synthetic.HELD_OUT_OFFSET + int(study.test_identities))
    n_lq, n_hq = int(study.test_degraded_probes_per_identity), int(study.test_clean_probes_per_identity)
    held_out, held_labels, _ = synthetic.render_arrays(test_ids, 1 + n_lq + n_hq, **render)
    k = 1 + n_lq + n_hq
    slot = np.tile(np.arange(k), len(test_ids))  # image index within its identity: 0 gallery, then probes
    lq = (slot >= 1) & (slot <= n_lq)
    keys = [(seed, int(held_labels[i]), int(slot[i]), 43) for i in np.flatnonzero(lq)]
    lq_images, lq_labels, lq_quality = _degraded_copies(held_out[lq], held_labels[lq], study.test_degraded, keys)
    hq = slot > n_lq
    probe_images = np.concatenate([lq_images, held_out[hq]])
    probe_labels = np.concatenate([lq_labels, held_labels[hq]])
    probe_quality = np.concatenate([lq_quality, np.ones(int(hq.sum()), np.float32)])
    probe_groups = np.array([DEGRADED] * int(lq.sum()) + [CLEAN] * int(hq.sum()))

    n_c1 = int(study.claim1_images_per_identity)
    c1, c1_labels, _ = synthetic.render_arrays(train_ids, n_c1, first_image=per_id, **render)
    keys = [(seed, int(c1_labels[i]), per_id + i % n_c1, 47) for i in range(len(c1))]
    c1_images, c1_labels, c1_quality = _degraded_copies(c1, c1_labels, study.claim1_degraded, keys)
    return StudyData(train_images, train_labels, held_out[slot == 0], held_labels[slot == 0], probe_images,
                     probe_labels, probe_quality, probe_groups, c1_images, c1_labels, c1_quality)


def batch_rows(seed: int, step: int, num_train: int, batch_size: int) -> np.ndarray:
    """Rows of the training set in batch ``step`` of seed ``seed``: epochs of a seeded permutation
    (the tail of an epoch that does not fill a batch is dropped), identical for every arm."""
    per_epoch = num_train // batch_size
    if per_epoch < 1:
        raise ConfigError(f"config.study: {num_train} training images cannot fill one batch of {batch_size}")
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch, 17]).permutation(num_train)
    return order[k * batch_size:(k + 1) * batch_size]


def batch_flips(seed: int, step: int, batch_size: int, flip_prob: float) -> np.ndarray:
    return np.random.default_rng([seed, step, 23]).random(batch_size) < flip_prob


def degraded_positions(seed: int, step: int, batch_size: int, share: float) -> np.ndarray:
    """Exactly ``round(share * batch_size)`` of the batch's positions, chosen by (seed, step)."""
    mask = np.zeros(batch_size, bool)
    mask[np.random.default_rng([seed, step, 31]).permutation(batch_size)[:int(round(share * batch_size))]] = True
    return mask


def degrade_rows(images: np.ndarray, mask: np.ndarray, seed: int, step: int, spec) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``mask`` degraded, row ``r`` by the draw keyed (seed, step, r) -> (uint8 images, quality)."""
    out = images.copy()
    q = np.ones(len(images), np.float32)
    for row in np.flatnonzero(mask):
        out[row], q[row] = degrade(images[row], np.random.default_rng([seed, step, int(row), 37]), spec)
    return out, q


def make_batch(data: StudyData, study, seed: int, step: int, batch_size: int) -> dict:
    """{'image': float32 model input, 'label', 'quality', 'rows', 'flips', 'degraded'}: the same for every
    arm (the oracle arm also feeds 'quality' to its head)."""
    rows = batch_rows(seed, step, data.train_images.shape[0], batch_size)
    flips = batch_flips(seed, step, batch_size, float(study.flip_prob))
    images = data.train_images[rows].copy()
    images[flips] = images[flips, :, ::-1]
    degraded = degraded_positions(seed, step, batch_size, float(study.degraded_share))
    images, q = degrade_rows(images, degraded, seed, step, study.train_degraded)
    return {"image": normalize_pixels(images), "label": data.train_labels[rows], "quality": q, "rows": rows,
            "flips": flips, "degraded": degraded}


def probe_batch(data: StudyData, study, seed: int) -> dict:
    """The fixed batch the mechanism is measured on: ``study.probe_images`` training rows evenly spaced over
    the identities, degraded as a training batch (the same share and draws), keyed by (seed, a step no
    training step reaches)."""
    n = data.train_images.shape[0]
    count = min(int(study.probe_images), n)
    rows = np.linspace(0, n - 1, count).round().astype(int)
    degraded = degraded_positions(seed, PROBE_BATCH_STEP, count, float(study.degraded_share))
    images, q = degrade_rows(data.train_images[rows], degraded, seed, PROBE_BATCH_STEP, study.train_degraded)
    return {"image": normalize_pixels(images), "label": data.train_labels[rows], "quality": q, "degraded": degraded}
