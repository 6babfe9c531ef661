"""Training augmentations (the original's Augmenter: crop, low resolution, photometric) as TensorFlow ops
on one uint8 BGR image, driven by stateless random ops.

`sample_params(seed, ...)` draws every random choice from a per-element seed (so a run is reproducible and
a resumed run sees the same augmentations); `apply_params(image, params)` applies them. Order and
probabilities follow the original Augmenter: crop with zero fill, low resolution, photometric, then a
horizontal flip.

Where TensorFlow differs from the original's OpenCV low-resolution step (documented, tested with a bound):
* nearest: cv2 INTER_NEAREST samples src[floor(x*scale)], tf samples at half-pixel centres, so the picked
  pixels may shift by one.
* bilinear: the same half-pixel sampling as cv2 INTER_LINEAR; only rounding differs (<= 1 grey level
  mostly).
* area: equal to cv2 INTER_AREA when shrinking by integer factors; when enlarging cv2 INTER_AREA behaves
  like bilinear while tf 'area' gives blocky (nearest-like) pixels.
* bicubic: Keys kernel a=-0.5 in tf versus a=-0.75 in cv2 (slightly less sharpening).
* lanczos: tf lanczos3 (6x6 taps) versus cv2 LANCZOS4 (8x8 taps).
These change the texture of the degraded images slightly, not their resolution, which is what the
augmentation is for.
"""
from __future__ import annotations

import math

import tensorflow as tf

RESIZE_METHODS = ("nearest", "bilinear", "area", "bicubic", "lanczos3")  # cv2: NEAREST LINEAR AREA CUBIC LANCZOS4
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
LOWRES_RANGE = (0.2, 1.0)
JITTER_RANGE = (0.5, 1.5)
PHOTOMETRIC_OPS = ("brightness", "contrast", "saturation")


def _uniform(seed, shape=(), lo=0.0, hi=1.0):
    return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi, dtype=tf.float32)


def sample_crop_box(seed, height: int, width: int, batch_shape=()):
    """torchvision RandomResizedCrop.get_params(scale=(0.2,1), ratio=(3/4,4/3)): int32 (..., 4) = (i, j, h, w)."""
    batch_shape = tuple(batch_shape)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    area = float(height * width)
    target_area = area * _uniform(seeds[0], batch_shape + (CROP_TRIES,), *CROP_SCALE)
    aspect = tf.exp(_uniform(seeds[1], batch_shape + (CROP_TRIES,), math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)  # tf.round is half-to-even like Python's round
    h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(valid, tf.int32), axis=-1, output_type=tf.int32)  # the first try that fits
    ok = tf.reduce_any(valid, axis=-1)
    hh = tf.gather(h, first, batch_dims=len(batch_shape))
    ww = tf.gather(w, first, batch_dims=len(batch_shape))
    # randint(0, H-h+1): uniform integer in [0, H-h]
    i = tf.cast(tf.floor(_uniform(seeds[2], batch_shape) * tf.cast(height - hh + 1, tf.float32)), tf.int32)
    j = tf.cast(tf.floor(_uniform(seeds[3], batch_shape) * tf.cast(width - ww + 1, tf.float32)), tf.int32)
    i, j = tf.minimum(i, height - hh), tf.minimum(j, width - ww)
    # Fallback: centre crop with the ratio clamped (for a square input that is the whole image).
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        fw, fh = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        fh, fw = height, int(round(height * CROP_RATIO[1]))
    else:
        fw, fh = width, height
    fallback = tf.constant([(height - fh) // 2, (width - fw) // 2, fh, fw], tf.int32)
    return tf.where(ok[..., None], tf.stack([i, j, hh, ww], axis=-1), fallback)


def sample_params(seed, image_size: int = 112, crop_prob: float = 0.2, lowres_prob: float = 0.2,
                  photometric_prob: float = 0.2, flip_prob: float = 0.5, batch_size: int | None = None) -> dict:
    """All random choices from a [2] int seed (stateless): for one image, or for `batch_size` images (each
    row then has its own independent draws, so the batch is a deterministic function of the seed)."""
    shape = () if batch_size is None else (batch_size,)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 9)
    gates = _uniform(seeds[0], shape + (4,))
    side = tf.cast(tf.floor(_uniform(seeds[2], shape, *LOWRES_RANGE) * image_size), tf.int32)
    interps = tf.random.stateless_uniform(shape + (2,), seed=seeds[3], minval=0, maxval=len(RESIZE_METHODS),
                                          dtype=tf.int32)
    factors = _uniform(seeds[4], shape + (3,), *JITTER_RANGE)  # brightness, contrast, saturation
    order = tf.cast(tf.argsort(_uniform(seeds[5], shape + (3,)), axis=-1), tf.int32)  # uniform permutation
    return {
        "crop": gates[..., 0] < crop_prob, "crop_box": sample_crop_box(seeds[1], image_size, image_size, shape),
        "lowres": gates[..., 1] < lowres_prob, "lowres_side": tf.maximum(side, 1),
        "interp_down": interps[..., 0], "interp_up": interps[..., 1],
        "photometric": gates[..., 2] < photometric_prob, "jitter_factors": factors, "jitter_order": order,
        "flip": gates[..., 3] < flip_prob,
    }


# ----------------------------------------------------------------------------------------------- ops

def crop_zero_fill(image, box):
    """Keeps image[i:i+h, j:j+w] and zeros elsewhere (no resize)."""
    i, j, h, w = box[0], box[1], box[2], box[3]
    shape = tf.shape(image)
    rows = tf.range(shape[0])
    cols = tf.range(shape[1])
    keep = ((rows >= i) & (rows < i + h))[:, None] & ((cols >= j) & (cols < j + w))[None, :]
    return tf.where(keep[:, :, None], image, tf.zeros_like(image))


def _resize_to_uint8(image, size, method_index):
    branches = [lambda m=m: tf.cast(tf.image.resize(image, size, method=m), tf.float32) for m in RESIZE_METHODS]
    out = tf.switch_case(method_index, branches)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)  # like cv2's saturate_cast


def low_resolution(image, side, interp_down, interp_up):
    """Resize to side x side and back, each with its own interpolation (indices into RESIZE_METHODS)."""
    size = tf.shape(image)[:2]
    small = _resize_to_uint8(image, tf.stack([side, side]), interp_down)
    return _resize_to_uint8(small, size, interp_up)


def luma(image_f):
    """PIL's L = (19595*c0 + 38470*c1 + 7471*c2 + 32768) >> 16 over channels in stored order (float in, int out)."""
    c = tf.cast(image_f, tf.int32)
    return tf.bitwise.right_shift(19595 * c[..., 0] + 38470 * c[..., 1] + 7471 * c[..., 2] + 32768, 16)


def _blend(degenerate, image_f, factor):
    """PIL Image.blend(degenerate, image, factor) on uint8 data: trunc(deg + f*(img-deg)) clipped to [0,255]."""
    return tf.floor(tf.clip_by_value(degenerate + factor * (image_f - degenerate), 0.0, 255.0))


def adjust_brightness(image_f, factor):
    return _blend(tf.zeros_like(image_f), image_f, factor)


def adjust_contrast(image_f, factor):
    lum = luma(image_f)
    mean = tf.reduce_sum(tf.cast(lum, tf.float64)) / tf.cast(tf.size(lum), tf.float64)
    grey = tf.cast(tf.floor(mean + 0.5), tf.float32)  # int(mean + 0.5)
    return _blend(tf.fill(tf.shape(image_f), grey), image_f, factor)


def adjust_saturation(image_f, factor):
    grey = tf.cast(luma(image_f), tf.float32)[..., None]
    return _blend(tf.broadcast_to(grey, tf.shape(image_f)), image_f, factor)


def photometric(image, factors, order):
    """Brightness, contrast and saturation with factors[0..2], applied in `order` (PIL ImageEnhance semantics)."""
    x = tf.cast(image, tf.float32)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation)
    for k in range(3):
        op_id = order[k]
        x = tf.switch_case(op_id, [lambda op=op, oid=oid: op(x, factors[oid]) for oid, op in enumerate(ops)])
    return tf.cast(x, tf.uint8)


def apply_params(image, params):
    """Applies sampled params to one uint8 BGR (H, W, 3) image; returns uint8."""
    image = tf.cond(params["crop"], lambda: crop_zero_fill(image, params["crop_box"]), lambda: image)
    image = tf.cond(params["lowres"], lambda: low_resolution(image, params["lowres_side"], params["interp_down"],
                                                             params["interp_up"]), lambda: image)
    image = tf.cond(params["photometric"],
                    lambda: photometric(image, params["jitter_factors"], params["jitter_order"]), lambda: image)
    image = tf.cond(params["flip"], lambda: tf.reverse(image, axis=[1]), lambda: image)
    image.set_shape([None, None, 3])
    return image


def augment(image, seed, image_size: int = 112, **probs):
    """sample_params + apply_params for one uint8 BGR image."""
    return apply_params(image, sample_params(seed, image_size, **probs))


# ----------------------------------------------------------------------------------------------- batched

_LUMA_WEIGHTS = (19595.0, 38470.0, 7471.0)


def _luma_float(x):
    """luma() in float32: every partial sum stays below 2**24, so the result is exact."""
    weighted = tf.tensordot(x, tf.constant(_LUMA_WEIGHTS), axes=[[-1], [0]])
    return tf.floor((weighted + 32768.0) * (1.0 / 65536.0))


def _photometric_planes(rows, factors, order):
    """photometric() on a uint8 batch [n, H, W, 3] with per-image factors [n, 3] and orders [n, 3].

    All three ops are PIL blends out = trunc(deg + f*(x - deg)) that differ only in the degenerate image
    (black, the mean grey, or L), so each step builds the chosen degenerate per image and blends once.
    The work runs on channel planes [n, H*W]: TensorFlow's CPU kernels are several times slower when an
    operand broadcasts over the channel axis. Every value is computed by the same float32 ops as in
    photometric(), so the result is bit-identical.
    """
    shape = tf.shape(rows)
    n = shape[0]
    pixels = tf.reshape(rows, [n, -1, 3])
    planes = [tf.cast(pixels[:, :, c], tf.float32) for c in range(3)]  # 3 x [n, H*W]
    for k in range(3):
        op = order[:, k]
        # PIL L in float32: every partial sum is an integer below 2**24, so any summation order is exact
        weighted = _LUMA_WEIGHTS[0] * planes[0] + _LUMA_WEIGHTS[1] * planes[1] + _LUMA_WEIGHTS[2] * planes[2]
        lum = tf.floor((weighted + 32768.0) * (1.0 / 65536.0))  # [n, H*W]
        mean = tf.reduce_mean(tf.cast(lum, tf.float64), axis=1, keepdims=True)
        grey = tf.cast(tf.floor(mean + 0.5), tf.float32)  # [n, 1]
        is_contrast = tf.cast(op == 1, tf.float32)[:, None]
        is_saturation = tf.cast(op == 2, tf.float32)[:, None]
        degenerate = is_saturation * lum + is_contrast * grey  # exactly 0, grey or L per image
        f = tf.gather(factors, op, batch_dims=1)[:, None]
        planes = [tf.raw_ops.ClipByValue(t=degenerate + f * (p - degenerate), clip_value_min=0.0,
                                         clip_value_max=255.0) for p in planes]
        if k < 2:  # after the last step the uint8 cast truncates, which is the same floor
            planes = [tf.floor(p) for p in planes]
    # back to interleaved channels: a product with the identity is exact and much faster than a stack on axis -1
    interleaved = tf.matmul(tf.reshape(tf.stack(planes), [3, -1]), tf.eye(3), transpose_a=True)
    return tf.reshape(tf.cast(interleaved, tf.uint8), shape)


class _LayeredBatch:
    """A batch edited by ops that each rewrite a subset of its images, without copying the whole batch per op.

    Each op's output rows are kept as a layer (indices, rows); `rows(idx)` reads the newest version of those
    images and `merged()` assembles the final batch with one dynamic_stitch (later layers win, as documented
    for tf.dynamic_stitch).
    """

    def __init__(self, images):
        self.batch = tf.shape(images)[0]
        self.layers = [(tf.range(self.batch), images)]
        self.newest = tf.zeros([self.batch], tf.int32)  # layer holding each image's newest version
        self.position = tf.range(self.batch)  # its row within that layer

    def rows(self, idx):
        if len(self.layers) == 1:
            return tf.gather(self.layers[0][1], idx)
        layer = tf.gather(self.newest, idx)
        position = tf.gather(self.position, idx)
        slots = tf.dynamic_partition(tf.range(tf.size(idx)), layer, len(self.layers))
        picks = tf.dynamic_partition(position, layer, len(self.layers))
        return tf.dynamic_stitch(slots, [tf.gather(rows, p) for (_, rows), p in zip(self.layers, picks)])

    def update(self, idx, new_rows):
        self.newest = tf.tensor_scatter_nd_update(self.newest, idx[:, None], tf.fill(tf.shape(idx), len(self.layers)))
        self.position = tf.tensor_scatter_nd_update(self.position, idx[:, None], tf.range(tf.size(idx)))
        self.layers.append((idx, new_rows))

    def merged(self):
        return tf.dynamic_stitch([i for i, _ in self.layers], [r for _, r in self.layers])


def apply_params_batch(images, params):
    """apply_params for a uint8 BGR batch [B, H, W, 3] with batched params (sample_params(batch_size=B)).

    Each op runs only on the images selected for it (gathered from their newest version), and the batch is
    assembled once at the end, so an op's cost follows its probability.
    """
    h, w = tf.shape(images)[1], tf.shape(images)[2]

    def crop(rows, idx):
        box = tf.gather(params["crop_box"], idx)
        r, c = tf.range(h)[None, :], tf.range(w)[None, :]
        keep_r = (r >= box[:, 0:1]) & (r < box[:, 0:1] + box[:, 2:3])
        keep_c = (c >= box[:, 1:2]) & (c < box[:, 1:2] + box[:, 3:4])
        keep_c = tf.repeat(keep_c, 3, axis=1)  # [n, W*3]: no broadcast over the channel axis
        keep = tf.cast(keep_r[:, :, None] & keep_c[:, None, :], tf.uint8)
        return tf.reshape(tf.reshape(rows, [-1, h, w * 3]) * keep, tf.shape(rows))

    def lowres(rows, idx):
        def per_image():
            return tf.map_fn(lambda a: low_resolution(a[0], a[1], a[2], a[3]),
                             (rows, tf.gather(params["lowres_side"], idx), tf.gather(params["interp_down"], idx),
                              tf.gather(params["interp_up"], idx)),
                             fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
        # eager map_fn over zero images loses the row shape, so an empty subset passes through
        return tf.cond(tf.size(idx) > 0, per_image, lambda: rows)

    def jitter(rows, idx):
        return _photometric_planes(rows, tf.gather(params["jitter_factors"], idx),
                                   tf.gather(params["jitter_order"], idx))

    def flip(rows, idx):
        # a 3-D [rows, W, C] reverse of the middle axis has a fast kernel; the 4-D one does not
        flat = tf.reshape(rows, [-1, w, 3])
        return tf.reshape(tf.reverse(flat, axis=[1]), tf.shape(rows))

    batch = _LayeredBatch(images)
    for gate, fn in (("crop", crop), ("lowres", lowres), ("photometric", jitter), ("flip", flip)):
        idx = tf.cast(tf.where(params[gate])[:, 0], tf.int32)
        batch.update(idx, fn(batch.rows(idx), idx))
    out = batch.merged()
    out.set_shape(images.shape)
    return out


def augment_batch(images, seed, image_size: int = 112, **probs):
    """Augments a uint8 BGR batch [B, H, W, 3]; `seed` [2] determines every image's draws."""
    batch_size = images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]
    return apply_params_batch(images, sample_params(seed, image_size, batch_size=batch_size, **probs))



# ----------------------------------------------------------------------------------------------- position keys

def global_step_seed(seed, epoch, step_in_epoch):
    """[2] int64 seed of one global batch: (seed * 1_000_003 + epoch, step in the epoch)."""
    return tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64),
                     tf.cast(step_in_epoch, tf.int64)])


def rows_params(seed, epoch, step_in_epoch, global_batch_size: int, first_row, num_rows: int,
                image_size: int = 112, **probs) -> dict:
    """The draws of global rows [first_row, first_row + num_rows) of one global batch.

    The draws of the whole global batch come from one seed keyed by (seed, epoch, step in the epoch), row j
    being image j of sample_params(batch_size=global_batch_size); a process keeps its rows. So an image's
    draws depend on its global position (epoch, step, row), never on how the batch is split over processes
    or devices. (Drawing the parameters of the B rows costs well under a millisecond; the per-image ops then
    run only on the process's rows.)"""
    params = sample_params(global_step_seed(seed, epoch, step_in_epoch), image_size, batch_size=global_batch_size,
                           **probs)
    return {k: v[first_row:first_row + num_rows] for k, v in params.items()}
