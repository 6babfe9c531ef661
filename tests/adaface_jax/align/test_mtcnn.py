"""AdaFace's MTCNN procedure on the mtcnn wheel's weights (the original's face_alignment/align.py, mtcnn.py, align_trans.py)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_jax.align import (
    REFERENCE_5PTS,
    AlignResult,
    FaceDetector,
    UnreadableImageError,
    align_face,
    align_faces,
    default_detector,
    detect_faces,
    similarity_cp2tform,
)
from adaface_jax.align import mtcnn as mtcnn_mod
from adaface_jax.align import nets

# face_alignment/mtcnn.py: AdaFace's own MTCNN on its three README photos (Pillow 13, torch CPU).
REF_LANDMARKS = {
    "img1": [(108.99, 86.23), (138.27, 86.00), (121.92, 105.17), (110.76, 120.28), (135.25, 120.81)],
    "img2": [(69.50, 85.43), (111.32, 84.88), (88.93, 109.88), (71.44, 134.00), (109.93, 132.16)],
    "img3": [(337.70, 257.16), (460.52, 245.57), (394.87, 338.04), (356.80, 398.21), (468.20, 389.84)],
}
REF_MATRIX = {
    "img1": [[1.1880, 0.0215, -92.379], [-0.0215, 1.1880, -48.645]],
    "img2": [[0.8318, -0.0077, -18.181], [0.0077, 0.8318, -19.678]],
    "img3": [[0.2795, -0.0239, -49.026], [0.0239, 0.2795, -28.801]],
}


def _photo(shared_data, name):
    return shared_data / "adaface_test_images" / f"{name}.jpeg"


@pytest.fixture(scope="module")
def aligned(shared_data):
    return {name: align_face(_photo(shared_data, name)) for name in REF_LANDMARKS}


@pytest.mark.parametrize("name", sorted(REF_LANDMARKS))
def test_landmarks_match_original(aligned, name):
    res = aligned[name]
    assert res.ok and res.num_faces == 1, res.error
    dev = np.abs(res.landmarks - np.array(REF_LANDMARKS[name])).max()
    print(f"{name}: max landmark deviation {dev:.4f} px")
    # Measured 0.0041-0.0049 px (the reference values are rounded to 0.01 px) with the pinned Pillow 13;
    # the README promises 0.005 px.
    assert dev < 0.02
    assert res.box[4] > 0.9


@pytest.mark.parametrize("name", sorted(REF_MATRIX))
def test_warp_matrix_matches_original(aligned, name):
    m = aligned[name].matrix
    ref = np.array(REF_MATRIX[name])
    # The references are rounded to 4 (linear part) and 3 (translation) decimals; measured deviations
    # 3.7e-5-4.5e-5 and 2.1e-4-4.8e-4, i.e. the rounding of the reference values.
    np.testing.assert_allclose(m[:, :2], ref[:, :2], atol=1e-4)
    np.testing.assert_allclose(m[:, 2], ref[:, 2], atol=1e-3)


def test_aligned_crop_is_the_cp2tform_warp_of_the_rgb_photo(shared_data, aligned):
    import cv2

    res = aligned["img2"]
    rgb = np.asarray(Image.open(_photo(shared_data, "img2")).convert("RGB"))
    m = similarity_cp2tform(res.landmarks, REFERENCE_5PTS)
    expected = cv2.warpAffine(rgb, m.astype(np.float64), (112, 112))
    assert res.face_rgb.shape == (112, 112, 3) and res.face_rgb.dtype == np.uint8
    np.testing.assert_array_equal(res.face_rgb, expected)
    np.testing.assert_array_equal(res.face_bgr, expected[:, :, ::-1])


def test_width_softmax_quirk_matters(shared_data):
    """Upstream's channel softmax finds the same faces but moves the landmarks (face_alignment/mtcnn_pytorch)."""
    plain = FaceDetector(pnet_width_softmax=False)
    devs = []
    for name in ("img1", "img2"):
        img = Image.open(_photo(shared_data, name)).convert("RGB")
        boxes, lms = plain.detect(img)
        assert len(boxes) == 1
        devs.append(np.abs(lms[0] - np.array(REF_LANDMARKS[name])).max())
    assert max(devs) > 0.5


def test_detect_faces_array_and_pil_agree(shared_data):
    img = Image.open(_photo(shared_data, "img1")).convert("RGB")
    b1, l1 = detect_faces(img)
    b2, l2 = detect_faces(np.asarray(img))
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(l1, l2)
    assert b1.shape == (1, 5) and l1.shape == (1, 5, 2)


def test_no_face_and_bad_inputs_do_not_break_a_batch(shared_data, tmp_path):
    rng = np.random.default_rng(0)
    blank = np.zeros((120, 160, 3), np.uint8)
    yy, xx = np.mgrid[0:150, 0:200]
    gradient = np.stack([xx, yy, xx + yy], -1).astype(np.float64)
    gradient_noise = np.clip(gradient + rng.normal(0, 20, gradient.shape), 0, 255).astype(np.uint8)
    tiny = np.full((8, 8, 3), 128, np.uint8)  # smaller than one P-Net cell: no pyramid level at all
    not_an_image = tmp_path / "broken.jpg"
    not_an_image.write_bytes(b"this is not a jpeg")
    missing = tmp_path / "missing.png"
    rgba_array = np.zeros((5, 5, 4), np.uint8)
    batch = [blank, _photo(shared_data, "img1"), gradient_noise, tiny, not_an_image, missing, rgba_array]
    results = align_faces(batch)
    assert [r.ok for r in results] == [False, True, False, False, False, False, False]
    assert all(isinstance(r, AlignResult) for r in results)
    assert results[0].error == "no face detected" and results[0].face_rgb is None
    assert results[2].error == "no face detected" and results[3].error == "no face detected"
    assert "unreadable" in results[4].error and results[4].source == str(not_an_image)
    assert "unreadable" in results[5].error
    assert "invalid image" in results[6].error
    assert results[1].face_rgb.shape == (112, 112, 3)
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        align_face(not_an_image, raise_on_unreadable=True)
    with pytest.raises(UnreadableImageError, match="missing.png"):
        align_faces([missing], raise_on_unreadable=True)


def test_select_largest_vs_score(shared_data):
    """Two photos pasted side by side: 'largest' picks the bigger face, 'score' the top score."""
    small = Image.open(_photo(shared_data, "img1")).convert("RGB")  # face ~30 px between the eyes
    big_src = Image.open(_photo(shared_data, "img2")).convert("RGB")
    big = big_src.resize((big_src.width * 3 // 2, big_src.height * 3 // 2), Image.BILINEAR)
    canvas = Image.new("RGB", (small.width + big.width, max(small.height, big.height)))
    canvas.paste(small, (0, 0))
    canvas.paste(big, (small.width, 0))
    boxes, _ = detect_faces(canvas)
    assert len(boxes) == 2
    largest = align_face(canvas, select="largest")
    best = align_face(canvas, select="score")
    assert largest.box[0] > small.width  # the face inside the enlarged photo
    assert best.box[4] == boxes[:, 4].max()
    assert np.all(np.diff(boxes[:, 4]) <= 0)  # highest score first


# ----------------------------------------------------------------------------- pipeline pieces


def test_pyramid_scales_hand_computed():
    scales = mtcnn_mod.pyramid_scales(998, 1168, min_face_size=20, factor=0.85)
    # 998 * 0.6 * 0.85^k > 12  <=>  k <= 24
    assert len(scales) == 25
    assert scales[0] == pytest.approx(0.6) and scales[-1] == pytest.approx(0.6 * 0.85**24)
    assert mtcnn_mod.pyramid_scales(20, 30, 20, 0.85) == []  # 20 * 0.6 = 12 is not > 12


def test_nms_union_min_strict_and_plus_one_areas():
    # Box A 0..9 (area 100 with +1), box B 5..14: intersection 5x10 = 50, union 150 -> IoU 1/3.
    boxes = np.array([[0, 0, 9, 9, 0.9], [5, 0, 14, 9, 0.8], [100, 100, 109, 109, 0.7]], float)
    assert mtcnn_mod.nms(boxes, 0.5) == [0, 1, 2]
    assert mtcnn_mod.nms(boxes, 0.3) == [0, 2]
    assert mtcnn_mod.nms(boxes, 1 / 3) == [0, 1, 2]  # strict '>' keeps an overlap equal to thr
    # 'min' mode: 50 / min(100, 100) = 0.5.
    assert mtcnn_mod.nms(boxes, 0.49, mode="min") == [0, 2]
    assert mtcnn_mod.nms(boxes, 0.5, mode="min") == [0, 1, 2]
    assert mtcnn_mod.nms(np.zeros((0, 5)), 0.5) == []


def test_calibrate_and_square_hand_computed():
    box = np.array([[10.0, 20.0, 29.0, 59.0, 0.8]])  # w=20, h=40 with +1
    cal = mtcnn_mod.calibrate(box, np.array([[0.1, -0.1, 0.2, 0.05]]))
    np.testing.assert_allclose(cal[0], [12.0, 16.0, 33.0, 61.0, 0.8])
    sq = mtcnn_mod.square(box)
    # side 40, centred on x: x1 = 10 + 10 - 20 = 0, x2 = 39; y unchanged; score zeroed like the original.
    np.testing.assert_allclose(sq[0], [0.0, 20.0, 39.0, 59.0, 0.0])


def test_crop_boxes_zero_fills_outside_and_clips_in_place():
    img = Image.fromarray(np.full((4, 4, 3), 255, np.uint8))
    boxes = np.array([[-2.0, -1.0, 3.0, 4.0, 0.0]])  # 6 x 6 box sticking out left, top and bottom
    crops = mtcnn_mod.crop_boxes(img, boxes, size=6)
    inside = np.zeros((6, 6), bool)
    inside[1:5, 2:6] = True  # rows y=0..3, cols x=0..3 of the image
    expected = np.where(inside, (255 - 127.5) * 0.0078125, -127.5 * 0.0078125)
    np.testing.assert_allclose(crops[0, :, :, 0], expected, atol=1e-6)
    np.testing.assert_array_equal(boxes[0, :4], [0.0, 0.0, 3.0, 3.0])


# ----------------------------------------------------------------------------- networks vs torch


@pytest.fixture(scope="module")
def torch_f():
    """torch.nn.functional (torch is a [dev] dependency: the CPU reference)."""
    return torch.nn.functional


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def test_conv_and_ceil_pool_match_torch(torch_f):
    F = torch_f
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 13, 11, 5)).astype(np.float32)
    k = rng.normal(size=(3, 2, 5, 7)).astype(np.float32)
    b = rng.normal(size=(7,)).astype(np.float32)
    ref = F.conv2d(_t(x.transpose(0, 3, 1, 2)), _t(k.transpose(3, 2, 0, 1)), _t(b)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(nets.conv2d_valid(x, k, b), ref, atol=1e-4)
    for size, stride in [(2, 2), (3, 2)]:
        ref = F.max_pool2d(_t(x.transpose(0, 3, 1, 2)), size, stride, ceil_mode=True).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(nets.max_pool_ceil(x, size, stride), ref)


def _torch_onet(F, w, x_nchw):
    """O-Net as the original writes it: NCHW, OIHW kernels, Caffe (C, W, H) flatten, fc [out, in]."""

    def conv(h, k, b):
        return F.conv2d(h, _t(k.transpose(3, 2, 0, 1)), _t(b))

    def prelu(h, a):
        return F.prelu(h, _t(a.reshape(-1)))

    h = prelu(conv(x_nchw, w[0], w[1]), w[2])
    h = F.max_pool2d(h, 3, 2, ceil_mode=True)
    h = prelu(conv(h, w[3], w[4]), w[5])
    h = F.max_pool2d(h, 3, 2, ceil_mode=True)
    h = prelu(conv(h, w[6], w[7]), w[8])
    h = F.max_pool2d(h, 2, 2, ceil_mode=True)
    h = prelu(conv(h, w[9], w[10]), w[11])  # (N, 128, 3, 3)
    n, c, hh, ww = h.shape
    flat = h.transpose(3, 2).contiguous().view(n, -1)  # Caffe order: c, then w, then h
    # The wheel's dense kernel rows are ordered (w, h, c); reorder them to Caffe's (c, w, h).
    fc = _t(w[12].reshape(ww, hh, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * ww * hh))
    h = F.prelu(flat @ fc.T + _t(w[13]), _t(w[14]))
    prob = F.softmax(h @ _t(w[19]) + _t(w[20]), dim=-1)[:, 1]
    return prob.numpy(), (h @ _t(w[15]) + _t(w[16])).numpy(), (h @ _t(w[17]) + _t(w[18])).numpy()


def test_onet_matches_torch_original_layout(torch_f):
    w = default_detector().weights.onet
    rng = np.random.default_rng(1)
    x = nets.preprocess(rng.integers(0, 256, size=(3, 48, 48, 3)))
    ours = nets.onet_forward(w, x)
    ref = _torch_onet(torch_f, w, _t(x.transpose(0, 3, 1, 2)))
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_pnet_width_softmax_matches_torch_dim_minus_one(torch_f):
    F = torch_f
    w = default_detector().weights.pnet
    x = nets.preprocess(np.random.default_rng(2).integers(0, 256, size=(1, 30, 41, 3)))
    prob, _ = nets.pnet_forward(w, x, width_softmax=True)
    # The trunk in torch, then the original's softmax(dim=-1) on the NCHW output.
    t = _t(x.transpose(0, 3, 1, 2))
    for (k, b, a), pool in [((w[0], w[1], w[2]), True), ((w[3], w[4], w[5]), False), ((w[6], w[7], w[8]), False)]:
        t = F.prelu(F.conv2d(t, _t(k.transpose(3, 2, 0, 1)), _t(b)), _t(a.reshape(-1)))
        if pool:
            t = F.max_pool2d(t, 2, 2, ceil_mode=True)
    out = F.conv2d(t, _t(w[11].transpose(3, 2, 0, 1)), _t(w[12]))
    ref = F.softmax(out, dim=-1)[0, 1].numpy()
    assert prob.shape == ref.shape == (math.ceil((30 - 2) / 2) - 4, math.ceil((41 - 2) / 2) - 4)
    np.testing.assert_allclose(prob, ref, atol=1e-5)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-5)
