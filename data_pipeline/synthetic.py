"""A procedurally rendered synthetic identity dataset (no downloads, no real faces).

Each identity is a seeded set of face parameters: head shape, skin, hair and eye colours, positions and
sizes of eyes, brows, nose and mouth, and a fixed low-frequency skin texture with marks. Each image adds
moderate nuisances (rotation, scale, shift, illumination gradient, expression, background) and
controllable degradations (blur, low resolution, noise, occlusion) whose overall severity d in [0, 1] is
recorded as quality = 1 - d. ``appearance='grey_shape'`` draws the colours per image and renders in grey,
so an identity is told by its shape and texture alone (colour survives low resolution and would otherwise
identify a face that nothing else does). ``low_quality`` degrades an image with explicit parameters.
Images are uint8 BGR drawn with OpenCV and stored as JPEG/PNG through cv2.imencode, so a standard decoder
returns RGB (channel order "RGB" in the manifest, like .rec data).
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from adaface_jax import io
from adaface_jax.errors import InputError
from data_pipeline.bin_reader import write_bin
from data_pipeline.prepare import SourcePlan, write_dataset

SIZE = 112
HELD_OUT_OFFSET = 1_000_000  # identities >= this are never used for training data
APPEARANCES = ("colour", "grey_shape")


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def identity_params(seed: int, identity: int) -> dict:
    """The fixed appearance of one identity."""
    r = _rng(seed, identity, 7)
    texture = r.normal(0.0, 1.0, (6, 6, 3)).astype(np.float32)
    return {
        "face_axes": (r.uniform(30, 40), r.uniform(38, 48)), "face_cy": r.uniform(56, 62),
        "skin": np.array([60, 90, 130]) + r.uniform() * np.array([110, 100, 110]) + r.uniform(-20, 20, 3),  # BGR
        "hair": r.uniform(0, 200, 3), "hairline": r.uniform(0.15, 0.55), "hair_side": r.uniform(0.0, 1.0),
        "eye_y": r.uniform(44, 54), "eye_dx": r.uniform(12, 19), "eye_size": (r.uniform(4, 7.5), r.uniform(2.5, 4.5)),
        "iris": r.uniform(0, 160, 3), "brow_dy": r.uniform(6, 11), "brow_tilt": r.uniform(-4, 4),
        "brow_thick": int(r.integers(1, 4)), "brow_len": r.uniform(6, 12),
        "nose_len": r.uniform(9, 20), "nose_w": r.uniform(3, 8), "mouth_y": r.uniform(74, 86),
        "mouth_w": r.uniform(8, 18), "lip": r.uniform([40, 40, 100], [140, 120, 220]),
        "texture": texture * r.uniform(8, 22),
        "marks": [(r.uniform(-25, 25), r.uniform(-25, 30), r.uniform(1.2, 3.0)) for _ in range(int(r.integers(0, 4)))],
        "glasses": bool(r.random() < 0.2), "beard": bool(r.random() < 0.25),
    }


def _draw_face(p: dict, expression: float, eye_open: float, background) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = np.asarray(background, np.uint8)
    cx, cy = SIZE / 2, p["face_cy"]
    ax, ay = p["face_axes"]
    hair = tuple(float(c) for c in p["hair"])
    # hair behind the head, then the face
    cv2.ellipse(img, (int(cx), int(cy - 4)), (int(ax + 5 + 6 * p["hair_side"]), int(ay + 4)), 0, 0, 360, hair, -1,
                cv2.LINE_AA)
    face = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(face, (int(cx), int(cy)), (int(ax), int(ay)), 0, 0, 360, 255, -1, cv2.LINE_AA)
    skin = np.asarray(p["skin"], np.float32) + cv2.resize(p["texture"], (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    alpha = face[..., None].astype(np.float32) / 255.0
    img = (img * (1 - alpha) + np.clip(skin, 0, 255) * alpha).astype(np.uint8)
    # hair on top of the forehead
    top = int(cy - ay)
    cv2.ellipse(img, (int(cx), top + int(ay * p["hairline"] * 0.5)), (int(ax + 2), int(ay * p["hairline"] + 4)),
                0, 180, 360, hair, -1, cv2.LINE_AA)
    for mx, my, mr in p["marks"]:
        cv2.circle(img, (int(cx + mx), int(cy + my)), int(mr), (40, 50, 70), -1, cv2.LINE_AA)
    if p["beard"]:
        cv2.ellipse(img, (int(cx), int(cy + ay * 0.55)), (int(ax * 0.75), int(ay * 0.45)), 0, 0, 180, hair, -1,
                    cv2.LINE_AA)
    ey, edx = p["eye_y"], p["eye_dx"]
    ew, eh = p["eye_size"]
    for side in (-1, 1):
        ex = cx + side * edx
        cv2.ellipse(img, (int(ex), int(ey)), (int(ew), max(1, int(eh * eye_open))), 0, 0, 360, (235, 235, 235), -1,
                    cv2.LINE_AA)
        cv2.circle(img, (int(ex), int(ey)), max(1, int(min(ew, eh) * 0.8 * eye_open + 0.5)),
                   tuple(float(c) for c in p["iris"]), -1, cv2.LINE_AA)
        by = ey - p["brow_dy"]
        bl = p["brow_len"]
        cv2.line(img, (int(ex - bl * 0.6), int(by + side * p["brow_tilt"] * 0.5)),
                 (int(ex + bl * 0.6), int(by - side * p["brow_tilt"] * 0.5)), hair, p["brow_thick"] + 1, cv2.LINE_AA)
        if p["glasses"]:
            cv2.circle(img, (int(ex), int(ey)), int(ew + 4), (30, 30, 30), 1, cv2.LINE_AA)
    nose_top, nose_len = ey + 2, p["nose_len"]
    dark = tuple(float(c) * 0.6 for c in p["skin"])
    pts = np.array([[cx, nose_top], [cx - p["nose_w"], nose_top + nose_len], [cx + p["nose_w"], nose_top + nose_len]],
                   np.int32)
    cv2.polylines(img, [pts], False, dark, 1, cv2.LINE_AA)
    my, mw = p["mouth_y"], p["mouth_w"]
    lip = tuple(float(c) for c in p["lip"])
    if expression > 0.3:  # smile / open mouth
        cv2.ellipse(img, (int(cx), int(my)), (int(mw), int(2 + 6 * (expression - 0.3))), 0, 0, 180, lip, -1,
                    cv2.LINE_AA)
    else:
        cv2.ellipse(img, (int(cx), int(my)), (int(mw), 3), 0, 0, 360, lip, -1, cv2.LINE_AA)
    return img


def image_tones(seed: int, identity: int, image_index: int) -> dict:
    """Skin, hair, iris and lip colours drawn per image (``appearance='grey_shape'``), from the same ranges as
    ``identity_params`` but from their own stream, so the image's other draws are unchanged."""
    r = _rng(seed, identity, image_index, 13)
    return {"skin": np.array([60, 90, 130]) + r.uniform() * np.array([110, 100, 110]) + r.uniform(-20, 20, 3),
            "hair": r.uniform(0, 200, 3), "iris": r.uniform(0, 160, 3),
            "lip": r.uniform([40, 40, 100], [140, 120, 220])}


def render(seed: int, identity: int, image_index: int, severity: float | None = None,
           appearance: str = "colour") -> tuple[np.ndarray, float]:
    """One uint8 BGR 112x112 image of `identity` and its quality (1 - degradation severity).

    severity: None draws it (most images mildly degraded: d = U(0,1)^2); a number in [0, 1] fixes it.
    appearance: 'colour' (the identity's colours) or 'grey_shape' (colours drawn per image, grey output).
    """
    if appearance not in APPEARANCES:
        raise ValueError(f"appearance={appearance!r}: expected one of {APPEARANCES}")
    p = identity_params(seed, identity)
    if appearance == "grey_shape":
        p = {**p, **image_tones(seed, identity, image_index)}
    r = _rng(seed, identity, image_index, 11)
    background = r.uniform(20, 235, 3)
    img = _draw_face(p, expression=r.uniform(0, 1), eye_open=r.uniform(0.55, 1.0), background=background)
    # pose: small in-plane rotation, scale and shift
    angle, scale = r.uniform(-10, 10), r.uniform(0.93, 1.07)
    m = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), angle, scale)
    m[:, 2] += r.uniform(-4, 4, 2)
    img = cv2.warpAffine(img, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # illumination: a linear gradient in a random direction times a global gain
    theta = r.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * (np.arange(SIZE)[None, :] - 56) + np.sin(theta) * (np.arange(SIZE)[:, None] - 56)) / 56
    gain = r.uniform(0.8, 1.15) * (1 + r.uniform(0, 0.3) * ramp)
    img = img.astype(np.float32) * gain[..., None].astype(np.float32)
    d = float(r.uniform() ** 2 if severity is None else np.clip(severity, 0.0, 1.0))
    if d > 0:
        img = _degrade(img, d, r)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if appearance == "grey_shape":
        img = np.repeat(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[..., None], 3, axis=2)
    return img, 1.0 - d


def _degrade(img: np.ndarray, d: float, r: np.random.Generator) -> np.ndarray:
    """Blur, low resolution, noise and occlusion, each with strength d * U(0.5, 1)."""
    s_blur, s_low, s_noise = d * r.uniform(0.5, 1.0, 3)
    if s_blur > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), 0.3 + 2.7 * s_blur)
    if s_low > 0.05:
        side = max(8, int(SIZE * (1 - 0.85 * s_low)))
        img = cv2.resize(cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA), (SIZE, SIZE),
                         interpolation=cv2.INTER_LINEAR)
    if s_noise > 0.05:
        img = img + r.normal(0, 25 * s_noise, img.shape).astype(np.float32)
    if r.random() < 0.5 * d:  # occluder (hand, object): a rectangle over part of the face
        w, h = np.minimum(r.uniform(0.2, 0.5, 2) * SIZE * (0.5 + d), 60).astype(int)
        x, y = int(r.uniform(10, SIZE - 10 - w)), int(r.uniform(20, SIZE - 10 - h))
        img[y:y + h, x:x + w] = r.uniform(0, 255, 3)
    return img


def low_quality(image: np.ndarray, side: int, noise_std: float, occluder=None,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """A uint8 (H, W, C) image as if captured at ``side`` x ``side`` pixels with sensor noise and enlarged: area
    down to ``side``, Gaussian noise of ``noise_std`` grey levels at that size (one value for all channels of a
    pixel, so a grey image stays grey; drawn from ``rng``), bilinear back up; then an ``occluder`` (x0, y0, x1,
    y1, grey) in fractions of the size painted over it."""
    h, w = image.shape[:2]
    small = image.astype(np.float32)
    if side < min(h, w):
        small = cv2.resize(small, (side, side), interpolation=cv2.INTER_AREA).reshape(side, side, -1)
    if noise_std > 0:
        small = small + rng.normal(0.0, noise_std, small.shape[:2] + (1,)).astype(np.float32)
    out = small
    if small.shape[:2] != (h, w):
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).reshape(image.shape)
    if occluder is not None:
        x0, y0, x1, y1, grey = occluder
        out[int(round(y0 * h)):int(round(y1 * h)), int(round(x0 * w)):int(round(x1 * w))] = grey
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def encode(image_bgr: np.ndarray, fmt: str = "jpg", quality: int = 92) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt in ("jpg", "jpeg") else []
    ok, buf = cv2.imencode("." + fmt, image_bgr, params)
    if not ok:
        raise ValueError(f"cv2.imencode failed for format {fmt}")
    return buf.tobytes()


def render_encoded(seed: int, identity: int, image_index: int, params: dict) -> tuple[bytes, float]:
    image, quality = render(seed, identity, image_index, params.get("severity"))
    return encode(image, params.get("format", "jpg")), quality


def check_synthetic_args(num_identities, images_per_identity, severity=None) -> None:
    """InputError naming the argument unless counts are positive integers and severity is in [0, 1]."""

    for name, value in (("identities", num_identities), ("images per identity", images_per_identity)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise InputError(f"number of {name} is {value!r}; expected a positive integer")
    if severity is not None and not (isinstance(severity, (int, float)) and 0.0 <= severity <= 1.0):
        raise InputError(f"severity {severity!r}: expected a number in [0, 1] (or none: drawn per image)")


def records(task: dict, stats: dict):
    """The converter's producer for synthetic shards (``prepare.SourcePlan.producer``): renders each
    planned (identity, image index, source index) and records its quality."""
    params = task["params"]
    for identity, image_index, index in task["items"]:
        data, quality = render_encoded(params["seed"], identity, image_index, params)
        stats["quality"].append(quality)
        yield data, identity - params.get("identity_offset", 0), index, quality


def write_synthetic_dataset(out_dir: str, num_identities: int = 200, images_per_identity: int = 20, seed: int = 0,
                            *, identity_offset: int = 0, severity: float | None = None, image_format: str = "jpg",
                            num_workers: int | None = None, num_shards: int | None = None,
                            show_progress: bool = True, force: bool = False,
                            verification: dict | None = None) -> dict:
    """Renders identities [offset, offset+N) x K images to TFRecord shards + manifest (quality feature) in
    out_dir (local or gs://). force: replace a dataset of another source in out_dir (otherwise InputError; the
    same one resumes). verification: {'name', 'num_identities', 'num_pairs'} also writes held-out pairs as
    out_dir/name (write_verification_bin) after the shards and before the manifest, which records it under
    'verification' -- so a dataset that looks finished has its .bin too."""
    check_synthetic_args(num_identities, images_per_identity, severity)
    n = num_identities * images_per_identity
    items = [(identity_offset + i, k, i * images_per_identity + k)
             for i in range(num_identities) for k in range(images_per_identity)]
    plan = SourcePlan(
        "synthetic", records, items, np.full(n, 4500, np.int64),
        {"kind": "synthetic", "seed": seed, "num_identities": num_identities,
         "images_per_identity": images_per_identity, "identity_offset": identity_offset, "severity": severity},
        {"seed": seed, "identity_offset": identity_offset, "severity": severity, "format": image_format},
        class_names=[f"id{identity_offset + i:07d}" for i in range(num_identities)], channel_order="RGB")
    if num_workers is None:
        num_workers = 0 if n < 50_000 else (os.cpu_count() or 1)  # spawning TF workers costs ~5 s each
    if num_shards is None:
        num_shards = max(4, int(np.ceil(n * 4500 / (150 << 20))))
    before_manifest = None
    if verification:
        def before_manifest(folder):
            info = write_verification_bin(io.join(folder, verification["name"]), verification["num_identities"],
                                          verification["num_pairs"], seed)
            return {"verification": {"bin": io.basename(info["bin"]), "quality": io.basename(info["quality"]),
                                     "num_pairs": info["num_pairs"]}}
    return write_dataset(plan, out_dir, name="synthetic_faces", num_workers=num_workers, num_shards=num_shards,
                         show_progress=show_progress, force=force, before_manifest=before_manifest)


def verification_pairs(num_pairs: int, num_identities: int, seed: int,
                       identity_offset: int = HELD_OUT_OFFSET) -> list[tuple[int, int, int, int, bool]]:
    """(identity_a, image_a, identity_b, image_b, same) for balanced same/different pairs of held-out ids."""
    r = _rng(seed, num_pairs, 3)
    pairs = []
    for k in range(num_pairs):
        same = k % 2 == 0
        a = int(r.integers(num_identities))
        b = a if same else int((a + r.integers(1, num_identities)) % num_identities)
        pairs.append((identity_offset + a, 10_000 + 2 * k, identity_offset + b, 10_001 + 2 * k, same))
    order = r.permutation(num_pairs)
    return [pairs[i] for i in order]


def write_verification_bin(path: str, num_identities: int = 100, num_pairs: int = 600, seed: int = 0, *,
                           identity_offset: int = HELD_OUT_OFFSET, severity: float | None = None,
                           image_format: str = "png") -> dict:
    """Writes held-out verification pairs as an InsightFace .bin (pickle((list of bytes, list of bools))).

    Per-image quality (1 - severity) goes to `<path without .bin>.quality.npy` (float32, 2N), in the same
    order as the images. Identities come from [identity_offset, identity_offset + num_identities), disjoint
    from training data written with the default offset 0. Returns {'bin', 'quality', 'num_pairs'}.
    """

    if num_identities < 2:
        raise ValueError("need at least 2 identities for different-identity pairs")
    path = io.check_output_file(path, "verification .bin", suffixes=(".bin",))
    quality_path = io.check_output_file(os.path.splitext(path)[0] + ".quality.npy", "verification quality",
                                        suffixes=(".npy",))
    images, issame, quality = [], [], []
    for ida, ima, idb, imb, same in verification_pairs(num_pairs, num_identities, seed, identity_offset):
        for identity, index in ((ida, ima), (idb, imb)):
            image, q = render(seed, identity, index, severity)
            images.append(encode(image, image_format))
            quality.append(q)
        issame.append(same)
    io.save_npy(quality_path, np.asarray(quality, np.float32))
    write_bin(path, images, issame)
    return {"bin": path, "quality": quality_path, "num_pairs": num_pairs}


def render_arrays(identities, images_per_identity: int, seed: int = 0, *, size: int = SIZE,
                  severity: str = "drawn", first_image: int = 0,
                  appearance: str = "colour") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-memory images of ``identities`` (ids as ``render`` takes them) -> (uint8 BGR (N, size, size, 3),
    int32 labels = position in ``identities``, float32 quality), identity-major.

    severity: 'drawn' (each image draws its own, mostly mild, as the training data), 'spread' (image k of
    K gets severity k / (K - 1): every identity covers the whole quality range, for quality-binned tests) or
    'none' (undegraded). Images are ``first_image, first_image + 1, ...`` of each identity; ``size`` != 112
    resizes (area); ``appearance`` as ``render``."""
    if severity not in ("drawn", "spread", "none"):
        raise ValueError(f"severity={severity!r}: expected 'drawn', 'spread' or 'none'")
    identities = list(identities)
    k = images_per_identity
    images = np.empty((len(identities) * k, size, size, 3), np.uint8)
    labels = np.repeat(np.arange(len(identities), dtype=np.int32), k)
    quality = np.empty(len(identities) * k, np.float32)
    for i, identity in enumerate(identities):
        for j in range(k):
            d = None if severity == "drawn" else (j / (k - 1) if k > 1 and severity == "spread" else 0.0)
            img, q = render(seed, identity, first_image + j, d, appearance)
            images[i * k + j] = img if size == SIZE else cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
            quality[i * k + j] = q
    return images, labels, quality
