"""The study's datasets, in memory: training images of some identities, test images of others, each
image with a quality label, and the batches every head sees (a pure function of (seed, step))."""
from __future__ import annotations

import dataclasses

import numpy as np

from adaface_jax.errors import InputError
from adaface_jax.features import normalize_bgr
from data_pipeline import synthetic, yale_b


@dataclasses.dataclass(frozen=True)
class StudyData:
    """uint8 BGR images (N, S, S, 3), int32 labels (0..classes-1 for training; test labels are their
    own identities), float32 quality (higher = better); ``quality_name`` labels the plots' axis."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    train_quality: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    test_quality: np.ndarray
    quality_name: str

    @property
    def num_classes(self) -> int:
        return int(self.train_labels.max()) + 1


def synthetic_data(study, image_size: int) -> StudyData:
    """Training identities 0..N-1 (severities as ``study.synthetic_train_severity``: 'drawn' as the training
    data is rendered, mostly mild); held-out identities from ``synthetic.HELD_OUT_OFFSET`` with severities
    spread evenly over [0, 1]."""
    train = synthetic.render_arrays(range(study.synthetic_train_identities), study.synthetic_images_per_identity,
                                    size=image_size, severity=study.get("synthetic_train_severity", "drawn"))
    test_ids = range(synthetic.HELD_OUT_OFFSET, synthetic.HELD_OUT_OFFSET + study.synthetic_test_identities)
    test = synthetic.render_arrays(test_ids, study.synthetic_test_images_per_identity, size=image_size,
                                   severity="spread")
    return StudyData("synthetic", *train, *test, quality_name="quality (1 - degradation severity)")


def yale_b_data(study, image_size: int, root: str) -> StudyData:
    """Cropped Extended Yale B: the last ``yale_b_test_identities`` subjects (in sorted order) are held out."""
    faces = yale_b.load_yale_b(root, image_size)
    num_test = int(study.yale_b_test_identities)
    num_subjects = len(faces.subjects)
    if not 2 <= num_test <= num_subjects - 2:
        raise InputError(f"{root}: {num_subjects} subjects; study.yale_b_test_identities={num_test} must leave at "
                         "least 2 for training and hold out at least 2")
    test = faces.labels >= num_subjects - num_test
    return StudyData("yale_b", faces.images[~test], faces.labels[~test], faces.quality[~test],
                     faces.images[test], faces.labels[test], faces.quality[test],
                     quality_name="quality = cos(light angle to the camera axis)")


def load_study_data(config, yale_b_dir: str | None) -> list[StudyData]:
    """Every dataset of ``config.study.datasets`` that can be built; Yale B needs ``yale_b_dir``."""
    out = []
    for name in config.study.datasets:
        if name == "synthetic":
            out.append(synthetic_data(config.study, config.data.image_size))
        elif name == "yale_b":
            if yale_b_dir:
                out.append(yale_b_data(config.study, config.data.image_size, yale_b_dir))
        else:
            raise InputError(f"config.study.datasets: unknown dataset {name!r}; expected 'synthetic' or 'yale_b'")
    if not out:
        raise InputError("no dataset to run: config.study.datasets is empty, or it names only yale_b and no "
                         "--yale-b folder was given")
    return out


def batch_rows(seed: int, step: int, num_train: int, batch_size: int) -> np.ndarray:
    """Rows of the training set in batch ``step`` of seed ``seed``: epochs of a seeded permutation
    (the tail of an epoch that does not fill a batch is dropped), identical for every head."""
    per_epoch = num_train // batch_size
    if per_epoch < 1:
        raise InputError(f"{num_train} training images cannot fill one batch of {batch_size}")
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch, 17]).permutation(num_train)
    return order[k * batch_size:(k + 1) * batch_size]


def batch_flips(seed: int, step: int, batch_size: int, flip_prob: float) -> np.ndarray:
    return np.random.default_rng([seed, step, 23]).random(batch_size) < flip_prob


def make_batch(data: StudyData, seed: int, step: int, batch_size: int, flip_prob: float) -> dict:
    """{'image': float32 BGR (x/255 - 0.5)/0.5, 'label', 'rows', 'flips'}: the same for every head."""
    rows = batch_rows(seed, step, data.train_images.shape[0], batch_size)
    flips = batch_flips(seed, step, batch_size, flip_prob)
    images = data.train_images[rows].copy()
    images[flips] = images[flips, :, ::-1]
    return {"image": normalize_bgr(images), "label": data.train_labels[rows],
            "rows": rows, "flips": flips}


def probe_rows(quality: np.ndarray, count: int) -> np.ndarray:
    """``count`` training rows evenly spaced in quality order (every quality level is probed)."""
    order = np.argsort(quality, kind="stable")
    count = min(count, order.size)
    return np.sort(order[np.linspace(0, order.size - 1, count).round().astype(int)])
