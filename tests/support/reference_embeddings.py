"""Embeddings of face crops by the PyTorch reference network, with the original inference code's input handling."""
import numpy as np
import torch


def torch_embed(backbone, rgb_crops):
    """The original inference.to_input: RGB -> BGR, (x/255-0.5)/0.5, NCHW."""
    x = np.stack([((c[:, :, ::-1].astype(np.float64) / 255.0) - 0.5) / 0.5 for c in rgb_crops]).astype(np.float32)
    with torch.no_grad():
        emb, norm = backbone(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return emb.numpy(), norm.numpy()


def torch_embed_bgr(tm, bgr_uint8, flip):
    """PyTorch reference: normalised BGR, optional flip fused by pre_norm_vector_add."""
    x = torch.from_numpy(((bgr_uint8.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        e, n = tm(x)
        if not flip:
            return e.numpy(), n.numpy()
        ef, nf = tm(torch.flip(x, dims=[3]))
    v = (e * n + ef * nf).numpy().astype(np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / norm, norm
