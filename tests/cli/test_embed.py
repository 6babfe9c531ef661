"""`adaface-jax embed`: the embeddings of aligned photos, aligned crops and the flip test equal the PyTorch
reference's, and the output never replaces a user's file."""
import cv2
import numpy as np
from PIL import Image

from adaface_jax.align import align_face
from adaface_jax.cli import main
from tests.support.cli_output import one_error_line
from tests.support.reference_embeddings import torch_embed
from tests.support.reference_embeddings import torch_embed_bgr as _torch_embed


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


def test_embed_flip_test_matches_the_pytorch_reference(converted_ir18, tmp_path, capsys):
    ckpt, tm = converted_ir18
    rng = np.random.default_rng(5)
    bgr = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    bgr[..., :56, :] //= 3  # not symmetric: the flip changes the features
    paths = []
    for i, im in enumerate(bgr):
        paths.append(str(tmp_path / f"face{i}.png"))
        cv2.imwrite(paths[-1], im)
    for flip in (True, False):
        out = tmp_path / f"feats_{flip}.npz"
        assert main(["embed", *paths, "--checkpoint", ckpt, "--out", str(out)] + (["--flip-test"] if flip else [])) == 0
        z = np.load(out)
        want_e, want_n = _torch_embed(tm, bgr, flip)
        np.testing.assert_allclose(z["embeddings"], want_e, atol=2e-4)
        np.testing.assert_allclose(z["norms"].reshape(-1, 1), want_n, rtol=2e-4)
        assert z["ok"].all()
    plain, fused = np.load(tmp_path / "feats_False.npz")["embeddings"], np.load(tmp_path / "feats_True.npz")["embeddings"]
    assert np.abs(plain - fused).max() > 1e-2  # the flag really changes what is saved


def test_embed_never_overwrites_a_photo_typed_after_out(files, tmp_path, capsys):
    """`embed --align --out photos/img1.jpeg photos/img2.jpeg` (a glob typed after --out): refused in one
    line before any work, the photo unchanged."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("img1.jpeg", "img2.jpeg"):
        (photos / name).write_bytes(b"\xff\xd8\xff\xe0 a JPEG " + name.encode())
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    argv = ["embed", "--checkpoint", str(files["good"]), "--align", "--out", str(photos / "img1.jpeg"),
            str(photos / "img2.jpeg")]
    assert main(argv) == 1
    one_error_line(capsys, "embed", "--out", "img1.jpeg", "expected a file name ending in .npz")
    # an existing .npz that is not an earlier output (a photo renamed, say) is not replaced either
    fake = photos / "faces.npz"
    fake.write_bytes(before["img1.jpeg"])
    assert main(["embed", str(photos / "img2.jpeg"), "--checkpoint", str(files["good"]), "--out", str(fake)]) == 1
    one_error_line(capsys, "embed", "faces.npz", "not an earlier .npz output")
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == {**before, "faces.npz": before["img1.jpeg"]}
