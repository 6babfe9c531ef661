"""`adaface-jax compare`: the printed similarity matrix and norms equal the PyTorch reference's on aligned photos."""
import numpy as np

from adaface_jax.align import align_face
from adaface_jax.cli import main
from tests.support.reference_embeddings import torch_embed


def test_compare_cli_prints_the_similarity_matrix(released, photos, capsys):
    paths, _ = photos
    assert main(["compare", *paths, "--checkpoint", str(released["path"])]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    crops = [align_face(p).face_rgb for p in paths]
    ref_emb, ref_norm = torch_embed(released["backbone"], crops)
    ref_sim = ref_emb @ ref_emb.T
    rows = [line.split() for line in printed[1:4]]
    assert [r[0] for r in rows] == ["img1.jpeg", "img2.jpeg", "img3.jpeg"]
    sim = np.array([[float(v) for v in r[1:4]] for r in rows])
    np.testing.assert_allclose(sim, ref_sim, atol=1.5e-4)  # printed with 4 decimals
    np.testing.assert_allclose([float(r[4]) for r in rows], ref_norm[:, 0], rtol=1e-3, atol=0.01)
