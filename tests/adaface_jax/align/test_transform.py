"""Similarity estimators and the 112x112 warp (the original's insightface_ijb_helper/dataloader.py `ImageAligner`, align_trans.py `warp_and_crop_face`)."""
import numpy as np
import pytest

from adaface_jax.align import (
    REFERENCE_5PTS,
    reduce_landmarks,
    similarity_cp2tform,
    similarity_umeyama,
    warp_face,
)

# insightface_ijb_helper/dataloader.py `ImageAligner` writes the template rounded to 4 decimals.
TEMPLATE_2_2 = np.array(
    [(38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041)],
    dtype=np.float32,
)


def umeyama_closed_form(src, dst):
    """Umeyama (1991) similarity src -> dst written out with numpy: returns the (2, 3) matrix."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / s_c.var(0).sum()
    trans = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, trans[:, None]], axis=1)


def apply(m, pts):
    return np.asarray(pts, np.float64) @ np.asarray(m, np.float64)[:, :2].T + np.asarray(m, np.float64)[:, 2]


def random_similarity(rng, max_angle_deg=60.0):
    """A (2,3) similarity mapping template space -> a plausible photo (face ~ 40..300 px)."""
    ang = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
    scale = rng.uniform(0.4, 3.0)
    rot = scale * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    return np.concatenate([rot, rng.uniform(0, 300, size=(2, 1))], axis=1)


def invert(m):
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def test_template_matches_both_spec_forms():
    assert REFERENCE_5PTS.dtype == np.float32 and REFERENCE_5PTS.shape == (5, 2)
    np.testing.assert_allclose(REFERENCE_5PTS, TEMPLATE_2_2, atol=1e-4)
    # align_trans.py `warp_and_crop_face`: the 96x112 points + (8, 0).
    base = np.array(
        [(30.29459953, 51.69630051), (65.53179932, 51.50139999), (48.02519989, 71.73660278),
         (33.54930115, 92.3655014), (62.72990036, 92.20410156)]
    )
    np.testing.assert_allclose(REFERENCE_5PTS, (base + [8.0, 0.0]).astype(np.float32), atol=0)


def test_umeyama_matches_numpy_closed_form_on_noisy_points():
    rng = np.random.default_rng(0)
    for _ in range(20):
        to_photo = random_similarity(rng)
        src = apply(to_photo, REFERENCE_5PTS) + rng.normal(0, 3.0, size=(5, 2))
        np.testing.assert_allclose(
            similarity_umeyama(src, REFERENCE_5PTS), umeyama_closed_form(src, REFERENCE_5PTS), rtol=1e-9, atol=1e-9
        )


def test_cp2tform_equals_umeyama_for_noise_free_points():
    rng = np.random.default_rng(1)
    for _ in range(20):
        to_photo = random_similarity(rng)
        src = apply(to_photo, REFERENCE_5PTS)
        expected = invert(to_photo)
        m_cp = similarity_cp2tform(src, REFERENCE_5PTS)
        m_um = similarity_umeyama(src, REFERENCE_5PTS)
        # cp2tform runs in float32 like the original: allow float32-level error.
        np.testing.assert_allclose(m_um, expected, rtol=1e-7, atol=1e-6)
        np.testing.assert_allclose(m_cp, m_um, rtol=2e-5, atol=1e-3)
        assert np.abs(apply(m_cp, src) - REFERENCE_5PTS).max() < 2e-3


def test_cp2tform_is_inverse_of_source_space_least_squares_on_noisy_points():
    """cp2tform fits template -> landmarks minimising error in *source* space, then inverts."""
    rng = np.random.default_rng(2)
    diffs = []
    for _ in range(20):
        src = apply(random_similarity(rng), REFERENCE_5PTS) + rng.normal(0, 2.0, size=(5, 2))
        m_cp = similarity_cp2tform(src, REFERENCE_5PTS)
        expected = invert(umeyama_closed_form(REFERENCE_5PTS, src))
        np.testing.assert_allclose(m_cp, expected, rtol=1e-4, atol=2e-3)
        diffs.append(np.abs(apply(m_cp, src) - apply(similarity_umeyama(src, REFERENCE_5PTS), src)).max())
    # ...which is not the template-space fit: with noise the two estimators differ.
    assert max(diffs) > 0.05


def test_cp2tform_reflective_choice():
    rng = np.random.default_rng(3)
    to_photo = random_similarity(rng, max_angle_deg=20)
    mirrored = to_photo @ np.diag([-1.0, 1.0, 1.0])  # x -> -x in template space first
    src = apply(mirrored, REFERENCE_5PTS)
    # With the residuals measured against the true template, the mirrored fit is exact and wins.
    m_fixed = similarity_cp2tform(src, REFERENCE_5PTS, replicate_reflection_bug=False)
    assert np.linalg.det(m_fixed[:, :2]) < 0
    assert np.abs(apply(m_fixed, src) - REFERENCE_5PTS).max() < 2e-3
    # Non-reflective only: a proper similarity (positive determinant).
    m_plain = similarity_cp2tform(src, REFERENCE_5PTS, reflective=False)
    assert np.linalg.det(m_plain[:, :2]) > 0
    # Ordinary faces: every variant keeps the non-reflective fit.
    src_face = apply(to_photo, REFERENCE_5PTS) + rng.normal(0, 1.0, size=(5, 2))
    ref = similarity_cp2tform(src_face, REFERENCE_5PTS, reflective=False)
    for bug in (True, False):
        np.testing.assert_array_equal(similarity_cp2tform(src_face, REFERENCE_5PTS, replicate_reflection_bug=bug), ref)


def test_cp2tform_rejects_degenerate_points():
    with pytest.raises(ValueError, match="rank"):
        similarity_cp2tform(np.ones((5, 2)) * 3.0, np.ones((5, 2)))


def _blob_image(points, shape, channel, sigma=2.5):
    """uint8 image, zero except Gaussian spots centred at `points` in one channel."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    acc = np.zeros(shape[:2])
    for x, y in points:
        acc += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    img = np.zeros(shape, np.uint8)
    img[:, :, channel] = np.clip(np.round(acc * 250), 0, 255).astype(np.uint8)
    return img


def _centroids(img, points, radius=6):
    out = []
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]].astype(np.float64)
    for x, y in points:
        win = (np.abs(xx - x) <= radius) & (np.abs(yy - y) <= radius)
        w = img.astype(np.float64) * win
        out.append(((w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()))
    return np.array(out)


@pytest.mark.parametrize("method", ["umeyama", "cp2tform"])
def test_warp_face_puts_landmarks_on_template(method):
    rng = np.random.default_rng(4)
    ang = np.deg2rad(17.0)
    scale = 1.6  # spots of sigma 2.5*1.6 px in the photo become sigma 2.5 px in the crop
    to_photo = np.array([[scale * np.cos(ang), -scale * np.sin(ang), 60.0],
                         [scale * np.sin(ang), scale * np.cos(ang), 20.0]])
    lm = apply(to_photo, REFERENCE_5PTS)
    img = _blob_image(lm, (260, 240, 3), channel=2, sigma=2.5 * scale)
    img[:, :, 0] = rng.integers(0, 5, size=img.shape[:2], dtype=np.uint8)  # weak noise in another channel
    out, m = warp_face(img, lm, method=method, return_matrix=True)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    assert out[:, :, 2].max() > 200 and out[:, :, 1].max() == 0  # channel order kept
    found = _centroids(out[:, :, 2], REFERENCE_5PTS)
    assert np.abs(found - REFERENCE_5PTS).max() < 0.5
    np.testing.assert_allclose(m, invert(to_photo), atol=1e-3)


def test_warp_face_grey_and_border():
    img = np.full((50, 40), 200, np.uint8)
    lm = apply(np.array([[0.3, 0, -5.0], [0, 0.3, -5.0]]), REFERENCE_5PTS)  # crop (0,0) -> photo (-5,-5)
    out = warp_face(img, lm)
    assert out.shape == (112, 112)
    assert out[0, 0] == 0 and out[56, 56] == 200  # constant-0 border outside the photo


def test_68_point_reduction():
    pts68 = np.arange(136, dtype=np.float64).reshape(68, 2) * 0.5
    five = reduce_landmarks(pts68)
    expected = np.array(
        [(pts68[36] + pts68[39]) / 2, (pts68[42] + pts68[45]) / 2, pts68[30], pts68[48], pts68[54]], np.float32
    )
    np.testing.assert_array_equal(five, expected)
    # Hand check of one value: point 36 = (36, 36.5), point 39 = (39, 39.5) -> (37.5, 38.0).
    np.testing.assert_array_equal(five[0], [37.5, 38.0])
    # warp_face accepts the 68 points and uses the reduced 5.
    img = np.random.default_rng(5).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    lm68 = np.random.default_rng(6).uniform(40, 160, (68, 2))
    np.testing.assert_array_equal(warp_face(img, lm68), warp_face(img, reduce_landmarks(lm68)))
    with pytest.raises(ValueError, match="68"):
        reduce_landmarks(np.zeros((7, 2)))
