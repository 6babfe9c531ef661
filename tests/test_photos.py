"""Photos -> MTCNN alignment -> embeddings -> similarity, through the `embed` and `compare` CLIs,
checked against the PyTorch reference network applied to the same aligned crops."""
import numpy as np
import pytest
import torch
from PIL import Image

from adaface_jax.align import align_face
from adaface_jax.cli import main
from torch_reference import build_backbone, randomize_


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("photos")
    backbone = randomize_(build_backbone("ir_18"), seed=3).eval()
    path = tmp / "model.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in backbone.state_dict().items()}}, path)
    return dict(tmp=tmp, path=path, backbone=backbone)


def torch_embed(backbone, rgb_crops):
    """The original inference.to_input: RGB -> BGR, (x/255-0.5)/0.5, NCHW."""
    x = np.stack([((c[:, :, ::-1].astype(np.float64) / 255.0) - 0.5) / 0.5 for c in rgb_crops]).astype(np.float32)
    with torch.no_grad():
        emb, norm = backbone(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return emb.numpy(), norm.numpy()


@pytest.fixture(scope="module")
def photos(shared_data, released):
    paths = [str(shared_data / "adaface_test_images" / f"img{i}.jpeg") for i in (1, 2, 3)]
    blank = released["tmp"] / "blank.png"
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(blank)
    return paths, str(blank)


def test_embed_cli_matches_pytorch_on_aligned_photos(released, photos, tmp_path):
    paths, blank = photos
    out = tmp_path / "feats.npz"
    rc = main(["embed", *paths, blank, "--checkpoint", str(released["path"]), "--out", str(out), "--align"])
    assert rc == 1  # one photo has no face: reported, not fatal
    with np.load(out) as z:
        emb, norms, ok, errors = z["embeddings"], z["norms"], z["ok"], list(z["errors"])
    assert ok.tolist() == [True, True, True, False]
    assert "no face" in errors[3] and np.isnan(emb[3]).all()
    crops = [align_face(p).face_rgb for p in paths]
    ref_emb, ref_norm = torch_embed(released["backbone"], crops)
    assert np.max(np.abs(emb[:3] - ref_emb)) < 1e-4
    assert np.max(np.abs(norms[:3] - ref_norm) / ref_norm) < 1e-4


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


def test_embed_without_align_reads_aligned_crops_and_rejects_other_sizes(released, photos, tmp_path):
    paths, _ = photos
    crop = align_face(paths[0]).face_rgb
    crop_path = tmp_path / "crop.png"
    Image.fromarray(crop).save(crop_path)  # PNG: lossless, so the crop read back is bit-identical
    out = tmp_path / "feats.npz"
    rc = main(["embed", str(crop_path), paths[0], "--checkpoint", str(released["path"]), "--out", str(out)])
    assert rc == 1
    with np.load(out) as z:
        assert z["ok"].tolist() == [True, False]
        assert "expected an aligned 112x112 face" in z["errors"][1] and "img1.jpeg" in z["errors"][1]
        ref_emb, _ = torch_embed(released["backbone"], [crop])
        assert np.max(np.abs(z["embeddings"][0] - ref_emb[0])) < 1e-4
