"""Random verification features: unit rows in pairs (2k, 2k+1), every other pair of the same identity."""
import numpy as np


def unit_rows(x):
    """``x`` with each row scaled to unit L2 norm, as float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def verification_pairs(seed=0, n_pairs=20, dim=8):
    """(features, issame): in a same-identity pair the second row is the first plus 0.4 times noise."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(2 * n_pairs, dim)).astype(np.float32)
    issame = np.tile([True, False], n_pairs // 2)
    f[1::2][issame] = f[0::2][issame] + 0.4 * f[1::2][issame]
    return unit_rows(f), issame
