"""The cropped Extended Yale B reader (data_pipeline.yale_b): names, quality, errors, the real folder."""
import os

import cv2
import numpy as np
import pytest

from adaface_jax.errors import InputError
from data_pipeline import yale_b


# --- Yale B (data_pipeline.yale_b) --------------------------------------------------------------------------------

def test_yale_b_names_and_quality():
    assert yale_b.parse_name("yaleB01_P00A+035E-20.jpg") == ("yaleB01", 35, -20)
    assert yale_b.parse_name("yaleB39_P00A-130E+20.pgm") == ("yaleB39", -130, 20)
    assert yale_b.parse_name("yaleB01_P00_Ambient.pgm") is None
    assert yale_b.parse_name("notes.txt") is None
    q = yale_b.light_quality(np.array([0, 90, 0, 60, 130]), np.array([0, 0, 90, 60, 0]))
    np.testing.assert_allclose(q, [1.0, 0.0, 0.0, 0.25, np.cos(np.radians(130))], atol=1e-12)
    np.testing.assert_allclose(yale_b.light_angle_deg(q), [0, 90, 90, np.degrees(np.arccos(0.25)), 130], atol=1e-9)


def _write_yale(root, subjects=("yaleB01", "yaleB02"), lights=((0, 0), (50, -40), (-110, 65))):
    for s_i, subject in enumerate(subjects):
        os.makedirs(root / subject)
        for a, e in lights:
            img = np.full((192, 168), 40 + 60 * s_i, np.uint8)
            img[:, :84] += 30  # left half brighter: the crop and resize are checked below
            cv2.imwrite(str(root / subject / f"{subject}_P00A{a:+04d}E{e:+03d}.jpg"), img)
        (root / subject / f"{subject}_P00_Ambient.jpg").write_bytes(b"skipped: no light direction")


def test_yale_b_reader_on_a_hand_made_folder(tmp_path):
    _write_yale(tmp_path)
    faces = yale_b.load_yale_b(str(tmp_path), size=28)
    assert faces.images.shape == (6, 28, 28, 3) and faces.subjects == ("yaleB01", "yaleB02")
    np.testing.assert_array_equal(faces.labels, [0, 0, 0, 1, 1, 1])
    by_name = dict(zip(faces.files, faces.quality))
    assert by_name[os.path.join("yaleB01", "yaleB01_P00A+000E+00.jpg")] == pytest.approx(1.0)
    assert by_name[os.path.join("yaleB02", "yaleB02_P00A+050E-40.jpg")] == pytest.approx(
        np.cos(np.radians(50)) * np.cos(np.radians(40)), abs=1e-6)
    assert np.all(faces.images[..., 0] == faces.images[..., 2])  # grey in three equal channels
    assert faces.images[0, 14, 3, 0] > faces.images[0, 14, 24, 0]  # left half brighter after the square crop


@pytest.mark.parametrize("case", ["missing", "one_subject", "undecodable", "wrong_folder"])
def test_yale_b_reader_errors_name_the_file(tmp_path, case):
    root = tmp_path / "yale"
    if case == "missing":
        match = "not a folder"
    elif case == "one_subject":
        _write_yale(root, subjects=("yaleB01",))
        match = "at least 2 subjects"
    elif case == "undecodable":
        _write_yale(root)
        (root / "yaleB02" / "yaleB02_P00A+000E+00.jpg").write_bytes(b"<html>not a jpeg</html>")
        match = "yaleB02_P00A\\+000E\\+00.jpg: not a decodable image"
    else:
        _write_yale(root)
        cv2.imwrite(str(root / "yaleB01" / "yaleB02_P00A+000E+00.jpg"), np.zeros((192, 168), np.uint8))
        match = "file of subject yaleB02 in folder yaleB01"
    with pytest.raises(InputError, match=match):
        yale_b.load_yale_b(str(root), size=16)


def test_real_yale_b(shared_data):
    faces = yale_b.load_yale_b(os.path.join(shared_data, "yale_b_cropped"), size=32)
    assert len(faces.subjects) == 38 and faces.images.shape == (2414, 32, 32, 3)
    frontal = [f.endswith("_P00A+000E+00.jpg") for f in faces.files]
    assert sum(frontal) == 38 and np.all(faces.quality[frontal] == 1.0)
    dark = faces.quality < -0.3
    assert faces.images[frontal].mean() > 2 * faces.images[dark].mean()
