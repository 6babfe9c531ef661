"""The study's data: shape-only grey identities, degradations, and batches that are a pure function of
(seed, step, row)."""
import cv2
import ml_collections
import numpy as np
import pytest

from adaface_jax.miniature import data as study_data
from data_pipeline import synthetic


# --- synthetic identities: shape only; degradations ---------------------------------------------------------

def _face_brightness(images):
    centre = images[:, 40:80, 35:77, 0].astype(float)  # the middle of the face, 112 px renders
    return centre.mean(axis=(1, 2))


def _intraclass_correlation(values, ids, per_id):
    groups = values.reshape(ids, per_id)
    between = groups.mean(axis=1).var(ddof=1) * per_id
    within = groups.var(axis=1, ddof=1).mean()
    return (between - within) / (between + (per_id - 1) * within)


def test_grey_shape_identities_carry_no_colour_or_brightness_cue():
    ids, per_id = 12, 6
    grey, labels, quality = synthetic.render_arrays(range(ids), per_id, severity="none", appearance="grey_shape")
    colour, _, _ = synthetic.render_arrays(range(ids), per_id, severity="none")
    assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2]) and np.all(quality == 1)
    # an identity's colours are its own in 'colour' (brightness identifies it); drawn per image in 'grey_shape'
    assert _intraclass_correlation(_face_brightness(colour), ids, per_id) > 0.5
    assert _intraclass_correlation(_face_brightness(grey), ids, per_id) < 0.25
    # everything but the colours is the identity's: the same pose draws, so the face outline is in place
    edges = lambda im: cv2.Canny(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), 30, 90) > 0
    same = np.mean([np.mean(edges(grey[k]) & edges(colour[k])) / np.mean(edges(colour[k])) for k in range(6)])
    assert same > 0.3
    with pytest.raises(ValueError, match="appearance"):
        synthetic.render(0, 1, 0, 0.0, "sepia")


def test_low_quality_resolution_noise_and_occluder():
    checker = ((np.indices((56, 56)).sum(axis=0) % 2) * 200 + 28).astype(np.uint8)[..., None].repeat(3, axis=2)
    low = synthetic.low_quality(checker, 8, 0.0)
    assert checker.std() > 90 and low.std() < 2  # a 1-px pattern does not survive 8 px
    np.testing.assert_array_equal(synthetic.low_quality(checker, 56, 0.0), checker)  # full size: unchanged
    flat = np.full((56, 56, 3), 128, np.uint8)
    noisy = synthetic.low_quality(flat, 56, 20.0, rng=np.random.default_rng(0)).astype(float)
    assert np.std(noisy[..., 0] - 128) == pytest.approx(20.0, rel=0.05)
    assert np.all(noisy[..., 0] == noisy[..., 2])  # one noise value per pixel: grey stays grey
    occluded = synthetic.low_quality(flat, 56, 0.0, occluder=(0.25, 0.5, 0.75, 1.0, 7.0))
    assert np.all(occluded[28:56, 14:42] == 7) and np.all(occluded[:28] == 128) and np.all(occluded[:, :14] == 128)


def test_quality_label_by_hand():
    w = study_data.SEVERITY_WEIGHTS
    assert study_data.quality(56, 0.0, False, 56) == pytest.approx(1.0)
    assert study_data.quality(4, 50.0, True, 56) == pytest.approx(0.0)
    expected = 1 - (w["resolution"] * np.log(7) / np.log(14) + w["noise"] * 0.5 + w["occluder"])
    assert study_data.quality(8, 25.0, True, 56) == pytest.approx(expected)
    sides = np.arange(4, 57)
    assert np.all(np.diff(study_data.quality(sides, 10.0, False, 56)) > 0)  # more pixels, better quality


# --- batches: a pure function of (seed, step, row) ----------------------------------------------------------

def _study(**overrides):
    deg = lambda side, noise, occ: ml_collections.ConfigDict({"side": side, "noise": noise, "occluder_prob": occ})
    s = ml_collections.ConfigDict(dict(
        data_seed=0, train_identities=4, train_images_per_identity=5, test_identities=3,
        test_degraded_probes_per_identity=2, test_clean_probes_per_identity=1, claim1_images_per_identity=2,
        train_degraded=deg((6, 10), (20.0, 50.0), 0.5), test_degraded=deg((12, 16), (10.0, 25.0), 0.0),
        claim1_degraded=deg((6, 56), (0.0, 50.0), 0.15), flip_prob=0.5, degraded_share=0.4, probe_images=10))
    s.update(overrides)
    return s


@pytest.fixture(scope="module")
def small_data():
    return study_data.build_study_data(_study(), 32)


def test_study_data_holds_out_identities_and_degrades_probes(small_data):
    d = small_data
    assert d.train_images.shape == (20, 32, 32, 3) and d.num_classes == 4
    assert d.gallery_images.shape[0] == 3 and list(d.gallery_labels) == [0, 1, 2]
    assert list(d.probe_groups) == ["degraded"] * 6 + ["clean"] * 3
    assert np.all(d.probe_quality[:6] < 0.8) and np.all(d.probe_quality[6:] == 1)
    held_out = synthetic.render(0, synthetic.HELD_OUT_OFFSET + 1, 0, 0.0, "grey_shape")[0]  # identity 1's gallery
    np.testing.assert_array_equal(d.gallery_images[1], cv2.resize(held_out, (32, 32), interpolation=cv2.INTER_AREA))
    clean_probe = synthetic.render(0, synthetic.HELD_OUT_OFFSET + 2, 3, 0.0, "grey_shape")[0]  # identity 2, image 3
    np.testing.assert_array_equal(d.probe_images[8], cv2.resize(clean_probe, (32, 32), interpolation=cv2.INTER_AREA))
    assert d.claim1_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and d.claim1_quality.min() < 0.6


def test_batches_are_keyed_by_seed_step_and_row(small_data):
    s = _study()
    b = study_data.make_batch(small_data, s, seed=3, step=2, batch_size=10)
    again = study_data.make_batch(small_data, s, seed=3, step=2, batch_size=10)
    assert all(np.array_equal(b[k], again[k]) for k in b)
    assert b["degraded"].sum() == 4  # exactly 40% of the rows
    assert np.all(b["quality"][b["degraded"]] < 0.6) and np.all(b["quality"][~b["degraded"]] == 1)
    for k, row in enumerate(b["rows"]):  # clean rows are the (flipped) training image
        if not b["degraded"][k]:
            image = small_data.train_images[row][:, ::-1] if b["flips"][k] else small_data.train_images[row]
            np.testing.assert_allclose(b["image"][k], image / 127.5 - 1.0, atol=1e-6)
    # a degraded row depends on (seed, step, row) only: other rows' images do not change it
    images = small_data.train_images[b["rows"]]
    other = images.copy()
    other[~b["degraded"]] = 0
    first, q1 = study_data.degrade_rows(images, b["degraded"], 3, 2, s.train_degraded)
    second, q2 = study_data.degrade_rows(other, b["degraded"], 3, 2, s.train_degraded)
    np.testing.assert_array_equal(first[b["degraded"]], second[b["degraded"]])
    np.testing.assert_array_equal(q1, q2)
    draws = study_data.draw_degradation(np.random.default_rng([3, 2, int(np.flatnonzero(b["degraded"])[0]), 37]),
                                        s.train_degraded, 32)
    assert q1[b["degraded"]][0] == pytest.approx(draws["quality"])
    other_step = study_data.make_batch(small_data, s, seed=3, step=3, batch_size=10)
    other_seed = study_data.make_batch(small_data, s, seed=4, step=2, batch_size=10)
    assert not np.array_equal(b["image"], other_step["image"]) and not np.array_equal(b["image"], other_seed["image"])


def test_epochs_cover_the_training_set_and_probe_batch_is_fixed(small_data):
    n, b = 50, 8  # 6 batches per epoch, the last 2 rows of each permutation dropped
    epoch0 = np.concatenate([study_data.batch_rows(1, s, n, b) for s in range(6)])
    assert len(set(epoch0)) == 48
    epoch1 = np.concatenate([study_data.batch_rows(1, s, n, b) for s in range(6, 12)])
    assert not np.array_equal(epoch0, epoch1)
    p = study_data.probe_batch(small_data, _study(), seed=1)
    again = study_data.probe_batch(small_data, _study(), 1)
    assert p["degraded"].sum() == 4 and np.array_equal(p["image"], again["image"])
    assert len(set(p["label"].tolist())) == 4  # spread over the identities
