"""data_pipeline.augment against an independent numpy / PIL / OpenCV reference of the original Augmenter
(the original's dataset/augmenter.py `Augmenter`): composition order, independence of the gates, and each low-resolution kernel.

The reference Augmenter below is written from dataset/augmenter.py `Augmenter`, not from our code: crop with zero fill (torchvision
RandomResizedCrop.get_params box, no resize), low resolution with cv2.resize down and up, ColorJitter's
brightness/contrast/saturation as PIL ImageEnhance in the drawn order, then a horizontal flip.  Only the
random draws come from `augment.sample_params`.
"""
import math

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance
from scipy import stats

from data_pipeline import augment

# The original draws np.random.choice over this list (dataset/augmenter.py `Augmenter` step 2), by index.
CV2_BY_INDEX = [cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4]
# torchvision ColorJitter fn_id 0, 1, 2 (hue, 3, is None in the recipe)
ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


# ----------------------------------------------------------------------------- reference Augmenter


def reference_augment(image, p):
    """One BGR uint8 image through the original's order: crop, low-res, photometric, flip (dataset/augmenter.py `Augmenter`)."""
    out = image.copy()
    if p["crop"]:
        i, j, h, w = (int(v) for v in p["crop_box"])
        cropped = np.zeros_like(out)
        cropped[i:i + h, j:j + w] = out[i:i + h, j:j + w]
        out = cropped
    if p["lowres"]:
        side = int(p["lowres_side"])
        small = cv2.resize(out, (side, side), interpolation=CV2_BY_INDEX[int(p["interp_down"])])
        out = cv2.resize(small, (image.shape[1], image.shape[0]), interpolation=CV2_BY_INDEX[int(p["interp_up"])])
    if p["photometric"]:
        pil = Image.fromarray(out, "RGB")  # BGR data wrapped as "RGB", as the original does
        for fn_id in p["jitter_order"]:
            pil = ENHANCERS[int(fn_id)](pil).enhance(float(p["jitter_factors"][int(fn_id)]))
        out = np.asarray(pil)
    if p["flip"]:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def block_image(rng, size=112):
    """Texture whose every aligned 2x2 block has an integer mean (b+d, b-d, b-e, b+e): a 2x area shrink is
    then exact in both OpenCV and TensorFlow, so the whole reference chain can be compared bit for bit,
    while the fine texture makes the photometric clip/floor interact with the averaging."""
    half = size // 2
    b = rng.integers(50, 206, (half, half, 3))
    d = rng.integers(0, 51, (half, half, 3))
    e = rng.integers(0, 51, (half, half, 3))
    out = np.empty((size, size, 3), np.int64)
    out[0::2, 0::2], out[0::2, 1::2], out[1::2, 0::2], out[1::2, 1::2] = b + d, b - d, b - e, b + e
    return out.astype(np.uint8)


def _numpy_params(params):
    return {k: np.asarray(v) for k, v in params.items()}


def _aligned_draws(seed, n, prob):
    """sample_params draws, with the low-res step pinned to the kernels where TensorFlow and OpenCV agree
    exactly (area shrink x2, then nearest enlarge x2) and the crop box rounded to even coordinates (so a
    crop keeps whole 2x2 blocks).  Every other value -- gates, box, factors, order, flip -- is as drawn."""
    p = _numpy_params(augment.sample_params(tf.constant(seed, tf.int64), 112, crop_prob=prob, lowres_prob=prob,
                                            photometric_prob=prob, flip_prob=0.5, batch_size=n))
    box = p["crop_box"].copy()
    box[:, :2] -= box[:, :2] % 2
    box[:, 2:] = np.maximum(box[:, 2:] - box[:, 2:] % 2, 2)
    p["crop_box"] = box
    p["lowres_side"] = np.full(n, 56, np.int32)
    p["interp_down"] = np.full(n, 2, np.int32)  # area
    p["interp_up"] = np.full(n, 0, np.int32)  # nearest
    return p


@pytest.mark.parametrize("seed,prob", [((11, 3), 0.6), ((12, 4), 1.0)])
def test_composition_order_matches_reference_augmenter(seed, prob):
    """apply_params and apply_params_batch equal the reference Augmenter bit for bit on drawn params: a
    different order (e.g. photometric before low-res, or crop after it) or a gate wired to the wrong op
    changes the images."""
    n = 24
    rng = np.random.default_rng(seed[0])
    images = np.stack([block_image(rng) for _ in range(n)])
    p = _aligned_draws(seed, n, prob)
    both = p["lowres"] & p["photometric"]
    assert both.sum() >= 6 and p["crop"].sum() >= 6 and (~p["flip"]).sum() >= 3 and p["flip"].sum() >= 3
    refs = np.stack([reference_augment(images[k], {key: v[k] for key, v in p.items()}) for k in range(n)])
    batched = augment.apply_params_batch(tf.constant(images), {k: tf.constant(v) for k, v in p.items()}).numpy()
    for k in range(n):
        single = augment.apply_params(tf.constant(images[k]), {key: tf.constant(v[k]) for key, v in p.items()})
        np.testing.assert_array_equal(single.numpy(), refs[k], err_msg=f"apply_params, image {k}")
        np.testing.assert_array_equal(batched[k], refs[k], err_msg=f"apply_params_batch, image {k}")
    # the order matters on these inputs: photometric before low-res gives other images
    swapped = 0
    for k in np.flatnonzero(both):
        q = {key: v[k] for key, v in p.items()}
        photo_first = reference_augment(images[k], dict(q, lowres=False, flip=False))
        photo_first = reference_augment(photo_first, dict(q, crop=False, photometric=False))
        swapped += not np.array_equal(photo_first, refs[k])
    assert swapped == both.sum()


# ----------------------------------------------------------------------------- gate independence


def test_gates_are_independent():
    """20k draws with distinct probabilities: the 16 joint cells of (crop, lowres, photometric, flip) follow
    the product of the marginals (chi-square), each marginal is its own probability, and the gates are
    independent of the values drawn for the ops (box, side, factors)."""
    n = 20000
    probs = {"crop": 0.2, "lowres": 0.3, "photometric": 0.4, "flip": 0.5}
    p = _numpy_params(augment.sample_params(tf.constant([21, 5], tf.int64), 112, crop_prob=probs["crop"],
                                            lowres_prob=probs["lowres"], photometric_prob=probs["photometric"],
                                            flip_prob=probs["flip"], batch_size=n))
    gates = np.stack([p[k] for k in probs], axis=1).astype(int)
    for col, (key, prob) in enumerate(probs.items()):
        sd = math.sqrt(prob * (1 - prob) / n)
        assert abs(gates[:, col].mean() - prob) < 5 * sd, (key, gates[:, col].mean(), prob)
    cell = gates @ (1 << np.arange(4))
    observed = np.bincount(cell, minlength=16)
    pr = np.array(list(probs.values()))
    expected = np.array([n * np.prod(np.where((c >> np.arange(4)) & 1, pr, 1 - pr)) for c in range(16)])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    p_value = float(stats.chi2.sf(chi2, df=15))
    print(f"\njoint gate cells: chi2 {chi2:.1f} (15 dof), p = {p_value:.3g}")
    assert p_value > 1e-4, (observed, expected.round())
    # pairwise: |corr| ~ N(0, 1/sqrt(n)) = 0.007 under independence; a shared uniform gives >= 0.4
    corr = np.corrcoef(gates.T)
    assert np.abs(corr[np.triu_indices(4, 1)]).max() < 0.04, corr
    # the values drawn for an op do not depend on whether its gate (or another) fired
    values = {"crop_box h": p["crop_box"][:, 2].astype(float), "crop_box i": p["crop_box"][:, 0].astype(float),
              "lowres_side": p["lowres_side"].astype(float), "interp_down": p["interp_down"].astype(float),
              "brightness": p["jitter_factors"][:, 0].astype(float)}
    for vname, v in values.items():
        for col, key in enumerate(probs):
            on, off = v[gates[:, col] == 1], v[gates[:, col] == 0]
            z = (on.mean() - off.mean()) / math.sqrt(on.var() / on.size + off.var() / off.size)
            assert abs(z) < 5, (vname, key, z)


# ----------------------------------------------------------------------------- low-resolution kernels

RNG = np.random.default_rng(0)
TEX = cv2.resize(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_CUBIC)
NOISE_23 = RNG.integers(0, 256, (23, 23, 3), dtype=np.uint8)
NOISE_37 = RNG.integers(0, 256, (37, 37, 3), dtype=np.uint8)


def _checker(side):
    return ((np.indices((side, side)).sum(0) % 2) * 200 + 28).astype(np.uint8)[..., None].repeat(3, 2)


# (image, output side) per kernel index, and the bound on the mean absolute difference (grey levels) to the
# matching cv2 kernel; measured values in the comments (TensorFlow 2.21, OpenCV 4.x).  Each case also
# requires the matching cv2 kernel to be the closest of the five.
KERNEL_CASES = {
    1: [(TEX, 40, 0.3), (TEX, 77, 0.3), (cv2.resize(TEX, (23, 23), interpolation=cv2.INTER_AREA), 112, 0.3),
        (NOISE_37, 112, 0.3)],                                          # bilinear: 0.12-0.13
    2: [(TEX, 23, 0.05), (TEX, 40, 0.05), (TEX, 77, 0.05),              # area shrink: 0.00-0.01
        (cv2.resize(TEX, (40, 40), interpolation=cv2.INTER_AREA), 112, 0.15), (NOISE_37, 112, 0.15)],  # 0.04
    3: [(_checker(56), 112, 1.0), (NOISE_23, 112, 5.0), (NOISE_37, 112, 5.0)],  # bicubic: 0.46, 3.89, 3.84
    4: [(_checker(56), 112, 2.0), (NOISE_23, 112, 4.5), (NOISE_37, 112, 4.5)],  # lanczos: 1.22, 3.71, 3.66
}


def _tf_resize(image, side, k):
    return augment._resize_to_uint8(tf.constant(image), tf.constant([side, side]), tf.constant(k)).numpy()


@pytest.mark.parametrize("k", sorted(KERNEL_CASES))
def test_each_lowres_kernel_is_its_opencv_counterpart(k):
    """Interpolation index k gives the kernel the original's cv2 flag k gives: among the five cv2 kernels the
    matching one is the closest, within a per-kernel bound (bicubic and lanczos swapped would miss both)."""
    for n_case, (src, side, bound) in enumerate(KERNEL_CASES[k]):
        ours = _tf_resize(src, side, k).astype(float)
        maes = [float(np.abs(ours - cv2.resize(src, (side, side), interpolation=f)).mean()) for f in CV2_BY_INDEX]
        print(f"\nkernel {k} ({augment.RESIZE_METHODS[k]}) case {n_case}: MAE to cv2 kernels "
              f"{np.round(maes, 2)}")
        assert int(np.argmin(maes)) == k and maes[k] <= bound, (k, n_case, maes)


@pytest.mark.parametrize("src,dst", [(112, 40), (112, 77), (112, 23), (112, 56), (23, 112), (40, 112), (56, 112)])
def test_nearest_kernel_picks_the_pixel_under_the_half_pixel_centre(src, dst):
    """Index 0 is a nearest-neighbour pick (documented: half-pixel centres, so not cv2's floor(x*scale)):
    on an image whose channels encode row and column, output x reads the source pixel whose span
    [idx, idx+1) holds (x + 0.5) * src/dst (up to float32 rounding at exact ties)."""
    r, c = np.indices((src, src))
    coded = np.stack([r, c, np.zeros_like(r)], -1).astype(np.uint8)
    out = _tf_resize(coded, dst, 0).astype(int)
    centre = (np.arange(dst) + 0.5) * src / dst
    for name, idx in (("rows", out[:, :, 0]), ("cols", out[:, :, 1].T)):
        assert (idx == idx[:, :1]).all(), name  # separable: a row index does not depend on the column
        picked = idx[:, 0]
        assert ((picked <= centre + 1e-4) & (centre < picked + 1 + 1e-4)).all(), (name, picked, centre)
    # and cv2 INTER_NEAREST (floor(x * scale)) is at most ceil(scale / 2) pixels away
    cv_idx = cv2.resize(coded, (dst, dst), interpolation=cv2.INTER_NEAREST)[:, 0, 0].astype(int)
    assert np.abs(out[:, 0, 0] - cv_idx).max() <= math.ceil(src / dst / 2)


def test_low_resolution_uses_interp_down_then_interp_up():
    """low_resolution(side, down, up) on a noise image equals cv2's down/up chain with exactly those kernels,
    for both orders of a (nearest, area) pair at a 2x factor, where the two libraries agree:
    nearest shrink = INTER_NEAREST_EXACT (half-pixel), area enlarge x2 = pixel replication."""
    img = np.random.default_rng(5).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    a = augment.low_resolution(tf.constant(img), tf.constant(56), tf.constant(0), tf.constant(2)).numpy()
    ref_a = cv2.resize(cv2.resize(img, (56, 56), interpolation=cv2.INTER_NEAREST_EXACT), (112, 112),
                       interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(a, ref_a)
    b = augment.low_resolution(tf.constant(img), tf.constant(56), tf.constant(2), tf.constant(0)).numpy()
    ref_b = cv2.resize(cv2.resize(img, (56, 56), interpolation=cv2.INTER_AREA), (112, 112),
                       interpolation=cv2.INTER_NEAREST)
    assert np.abs(b.astype(int) - ref_b).max() <= 1  # area shrink rounding only
    assert np.abs(a.astype(int) - b).mean() > 20  # the two orders really differ on noise
