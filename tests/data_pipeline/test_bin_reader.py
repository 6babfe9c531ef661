"""InsightFace .bin reader: real files, safety of the unpickler, clear errors, cache, synthetic pairs."""
import os
import pickle

import cv2
import numpy as np
import pytest

from data_pipeline import bin_reader, synthetic


def _raw_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # trusted test fixture: plain pickle as the reference


def test_small_lfw_matches_cv2(shared_data):
    path = shared_data / "small_lfw.bin"
    images, issame = bin_reader.load_bin(path)
    bins, ref_issame = _raw_pickle(path)
    assert images.shape == (20, 112, 112, 3) and images.dtype == np.uint8
    assert issame.dtype == bool and issame.tolist() == list(ref_issame) and issame.all()
    for i, element in enumerate(bins):
        np.testing.assert_array_equal(images[i], cv2.imdecode(np.asarray(element).reshape(-1), cv2.IMREAD_COLOR))


def test_lfw_gray112_counts_and_subset(shared_data):
    path = shared_data / "lfw_gray112.bin"
    bins, issame = bin_reader.safe_unpickle_bin(path)
    assert len(bins) == 12000 and issame.shape == (6000,) and issame.sum() == 3000
    # pairs.txt order: each fold is 300 same then 300 different
    assert issame[:300].all() and not issame[300:600].any()
    subset = bin_reader.decode_bin_images(bins[:40], str(path))
    for i in range(40):
        np.testing.assert_array_equal(subset[i], cv2.imdecode(np.frombuffer(bins[i], np.uint8), cv2.IMREAD_COLOR))
    assert (subset[..., 0] == subset[..., 2]).all()  # greyscale: channels equal


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_refused_without_running_code(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(sentinel), b"x"], [True])))
    with pytest.raises(bin_reader.UnsafePickleError, match="refusing to load global"):
        bin_reader.load_bin(path)
    assert not sentinel.exists()
    # a numpy array of another dtype is refused as well (only uint8/bool arrays may appear)
    path.write_bytes(pickle.dumps(([np.zeros(3, np.float64), b"x"], [True])))
    with pytest.raises(bin_reader.UnsafePickleError, match="dtype"):
        bin_reader.load_bin(path)


def test_bad_element_named(tmp_path):
    good = cv2.imencode(".png", np.full((112, 112, 3), 7, np.uint8))[1].tobytes()
    path = tmp_path / "bad.bin"
    bin_reader.write_bin(str(path), [good, good, good, b"not an image"], [True, False])
    with pytest.raises(ValueError, match=r"bad\.bin: element 3 is not a decodable image"):
        bin_reader.load_bin(path)
    path.write_bytes(pickle.dumps(([good, good, good], [True, False])))
    with pytest.raises(ValueError, match="3 images but 2 pairs"):
        bin_reader.load_bin(path)


def test_bytearray_and_numpy_bool_and_cache(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(4)]
    encoded = [bytearray(cv2.imencode(".png", im)[1].tobytes()) for im in imgs]
    path = tmp_path / "set.bin"
    path.write_bytes(pickle.dumps((encoded, np.array([True, False])), protocol=5))
    images, issame = bin_reader.load_bin(path)
    np.testing.assert_array_equal(images, np.stack(imgs))  # PNG is lossless and cv2 order is BGR both ways
    assert issame.tolist() == [True, False]
    cache = tmp_path / "cache"
    first, _ = bin_reader.load_bin(path, cache_dir=str(cache))
    second, issame2 = bin_reader.load_bin(path, cache_dir=str(cache))
    assert isinstance(second, np.memmap)
    np.testing.assert_array_equal(second, np.stack(imgs))
    assert issame2.tolist() == [True, False]


def _pair_accuracy(images, issame):
    """Best-threshold accuracy of raw-pixel cosine similarity over the face centre (a trivial baseline)."""
    x = images[:, 30:90, 28:84].reshape(len(images), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = np.sum(x[0::2] * x[1::2], axis=1)
    return max(np.mean((sims >= t) == issame) for t in np.unique(sims))


def test_synthetic_verification_bin_is_learnable_and_quality_ordered(tmp_path):
    clean = synthetic.write_verification_bin(str(tmp_path / "clean.bin"), 20, 200, seed=1, severity=0.0)
    hard = synthetic.write_verification_bin(str(tmp_path / "hard.bin"), 20, 200, seed=1, severity=1.0)
    ci, cs = bin_reader.load_bin(clean["bin"])
    hi, hs = bin_reader.load_bin(hard["bin"])
    assert cs.sum() == 100 and ci.shape == (400, 112, 112, 3)
    np.testing.assert_allclose(np.load(clean["quality"]), 1.0)
    np.testing.assert_allclose(np.load(hard["quality"]), 0.0)
    acc_clean, acc_hard = _pair_accuracy(ci, cs), _pair_accuracy(hi, hs)
    assert acc_clean > 0.7, acc_clean
    assert acc_hard < acc_clean - 0.05, (acc_clean, acc_hard)
