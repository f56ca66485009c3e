"""MoCo-v2 pixel augmentation and flip as numpy/OpenCV functions (one float32 image at a time, on the host).

Order and probabilities as in MoCo v2 / InsLoc: colour jitter (brightness 0.4, contrast 0.4, saturation
0.4, hue 0.1, the four in a random order) with p=0.8, grayscale p=0.2, Gaussian blur sigma U(0.1, 2.0)
p=0.5, horizontal flip p=0.5 (the box follows), then normalisation.

Definitions follow torchvision's functional ops on float images, here in the 0..255 range and clamped to
it after every op (no intermediate rounding to uint8):
  brightness f: x * f
  contrast f:   f * x + (1 - f) * mean(gray(x))       (one scalar per image)
  saturation f: f * x + (1 - f) * gray(x)              (per pixel)
  hue d:        H <- (H + d) mod 1 in HSV
  gray(x) = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2 luma), grayscale output keeps three channels.
Blur: MoCo uses PIL's GaussianBlur(radius=sigma), which approximates a Gaussian of standard deviation sigma
with three box blurs. We use an exact separable Gaussian with that sigma, truncated at 6 pixels (3 sigma for
the largest sigma, 2.0), i.e. a fixed 13-tap kernel, with reflected borders (numpy 'reflect', i.e.
cv2.BORDER_REFLECT_101).

The random decisions are drawn by `sample_params` from an explicit np.random.Generator, separately from the
pixel ops, so the same parameters can be applied here or by `augment_jax` on the accelerator. Both compute
the same ops in float32, in the same order and with the same clamps; here OpenCV runs the loops (cvtColor
for luma and HSV, one equivalent colour matrix per blend in cv2.transform, sepFilter2D for the blur), so the
two agree up to float32 rounding (about 1e-5 on normalised pixels, tested to 1e-4). The public ops never
modify their input. OpenCV may use several threads per call; a worker process that wants one core per
worker should call cv2.setNumThreads(1).
"""
import threading

import cv2
import numpy as np

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
LUMA = (0.299, 0.587, 0.114)
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
SIGMA_RANGE = (0.1, 2.0)
BLUR_RADIUS = 6
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

_LUMA_ROWS = np.tile(np.array(LUMA, np.float32), (3, 1))  # [3, 3]: every output channel is the luma
_EYE = np.eye(3, dtype=np.float32)


def sample_params(rng):
    """Draws the augmentation parameters of one view.

    Draws u = rng.random(13) once and uses, in this order: u[0:4] for apply (u < probability), u[4:8] for
    the four factors, u[8:12] as sort keys of the jitter order (order = argsort), u[12] for sigma.

    Args:
      rng: np.random.Generator of this view.

    Returns:
      dict: apply (bool [4]: jitter, gray, blur, flip), factors (float32 [4]: brightness, contrast,
      saturation factors and hue shift), order (int32 [4]: op ids in application order), sigma
      (np.float32 scalar).
    """
    u = rng.random(13)
    apply = u[0:4] < np.array([P_JITTER, P_GRAY, P_BLUR, P_FLIP])
    strength = np.array(JITTER)
    # Factors in [1 - s, 1 + s] for the three blends (never negative for s <= 1); hue shift in [-s, s].
    factors = np.where(np.arange(4) < HUE, 1.0 - strength + 2.0 * strength * u[4:8],
                       strength * (2.0 * u[4:8] - 1.0))
    order = np.argsort(u[8:12]).astype(np.int32)
    sigma = np.float32(SIGMA_RANGE[0] + (SIGMA_RANGE[1] - SIGMA_RANGE[0]) * u[12])
    return {"apply": apply, "factors": factors.astype(np.float32), "order": order, "sigma": sigma}


def _f32(image):
    """float32, C-contiguous (what the OpenCV calls need); no copy when it already is."""
    return np.ascontiguousarray(image, np.float32)


def _clip_(image):
    """Clamps to 0..255 in place and returns the image."""
    return np.clip(image, 0.0, 255.0, out=image)


# Each op below is `_op(src, arg, dst)`: float32 C-contiguous src, result written into dst (which may be src)
# or, for dst=None, into a new array. `augment` runs them in place on one buffer: fresh 768 KB temporaries
# per op cost more than the arithmetic once the allocator starts returning memory to the system.
def _brightness(src, factor, dst=None):
    return _clip_(np.multiply(src, np.float32(factor), out=dst))


def _contrast(src, factor, dst=None):
    # mean(gray(x)) = luma . (per-channel means), by linearity; cv2.mean accumulates in float64 and needs
    # no gray image.
    channel_means = cv2.mean(src)[:3]
    mean = np.float32(sum(w * m for w, m in zip(LUMA, channel_means)))
    return _clip_(cv2.transform(src, _blend_matrix(factor, 0.0, mean), dst=dst))


def _saturation(src, factor, dst=None):
    return _clip_(cv2.transform(src, _blend_matrix(factor, _LUMA_ROWS), dst=dst))


def _hue(src, shift, dst=None):
    # OpenCV's float HSV has H in degrees [0, 360). Its HSV -> RGB wraps any H >= 0 into [0, 360) but not a
    # negative one, so a negative shift is applied as the equivalent positive one: H + d stays in [0, 720).
    degrees = np.float32(360.0) * np.float32(shift)
    if degrees < 0:
        degrees += np.float32(360.0)
    hsv = cv2.cvtColor(src, cv2.COLOR_RGB2HSV, dst=dst)
    hsv = cv2.add(hsv, (float(degrees), 0.0, 0.0, 0.0), dst=hsv)
    return _clip_(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=hsv))


_OPS = (_brightness, _contrast, _saturation, _hue)


def _blend_matrix(factor, weights, offset=0.0):
    """[3, 4] affine map x -> factor * x + (1 - factor) * (weights @ x + offset), for cv2.transform."""
    factor = np.float32(factor)
    rest = np.float32(1.0) - factor
    matrix = np.empty((3, 4), np.float32)
    matrix[:, :3] = factor * _EYE + rest * weights
    matrix[:, 3] = rest * np.float32(offset)
    return matrix


def gray(image):
    """Luma, float32 [H, W, 3] -> [H, W, 1]."""
    return cv2.cvtColor(_f32(image), cv2.COLOR_RGB2GRAY)[..., None]


def adjust_brightness(image, factor):
    """Brightness: blend with black. image float32 [H, W, 3] in 0..255."""
    return _brightness(_f32(image), factor)


def adjust_contrast(image, factor):
    """Contrast: blend with the image's mean gray level (a scalar)."""
    return _contrast(_f32(image), factor)


def adjust_saturation(image, factor):
    """Saturation: blend with the per-pixel gray image (one 3x3 colour matrix: f I + (1 - f) luma)."""
    return _saturation(_f32(image), factor)


def adjust_hue(image, shift):
    """Hue rotation by `shift` turns in HSV (shift in [-0.5, 0.5]); HSV is scale-free so 0..255 works."""
    return _hue(_f32(image), shift)


def _jitter(image, factors, order, in_place):
    factors = np.asarray(factors, np.float32)
    for op in np.asarray(order).tolist():
        image = _OPS[op](image, factors[op], image if in_place else None)
        in_place = True  # after the first op the image is our own
    return image


def color_jitter(image, factors, order):
    """The four jitter ops in the given order.

    Args:
      image: float32 [H, W, 3] in 0..255.
      factors: float32 [4], see sample_params.
      order: int [4] op ids (BRIGHTNESS, CONTRAST, SATURATION, HUE) in application order.

    Returns:
      float32 [H, W, 3] in 0..255, a new array.
    """
    return _jitter(_f32(image), factors, order, in_place=False)


def gaussian_kernel(sigma, radius=BLUR_RADIUS):
    """Normalised 1-d Gaussian weights, float32 [2 * radius + 1]."""
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    weights = np.exp(np.float32(-0.5) * np.square(x / np.float32(sigma)))
    return weights / weights.sum(dtype=np.float32)


def _blur(src, sigma, dst=None):
    """dst must not be src."""
    kernel = gaussian_kernel(sigma)
    # Each channel on its own; the kernel is symmetric, so OpenCV's correlation is the convolution.
    return cv2.sepFilter2D(src, -1, kernel, kernel, dst=dst, borderType=cv2.BORDER_REFLECT_101)


def gaussian_blur(image, sigma):
    """Separable Gaussian blur with reflected borders, float32 [H, W, 3] -> [H, W, 3]."""
    return _blur(_f32(image), sigma)


def _flip_box(box, width):
    box = np.asarray(box, np.float32)
    width = np.float32(width)
    return np.array([width - box[2], box[1], width - box[0], box[3]], np.float32)


def flip(image, box):
    """Horizontal flip of an [H, W, C] image and its float32 [4] xyxy box; a new image."""
    if image.ndim == 3 and image.shape[2] <= 4:
        flipped = cv2.flip(np.ascontiguousarray(image), 1)
    else:
        flipped = image[:, ::-1].copy()
    return flipped, _flip_box(box, image.shape[1])


def _normalize(src, dst=None):
    dst = cv2.subtract(src, MEAN + (0.0,), dst=dst)
    return cv2.divide(dst, STD + (1.0,), dst=dst)


def normalize(image):
    """Per-channel (x - mean) / std on RGB in 0..255, float32 [H, W, 3]."""
    return _normalize(_f32(image))


def augment(image, box, params, out=None):
    """Applies one view's augmentation.

    Args:
      image: uint8 [H, W, 3].
      box: float32 [4] xyxy.
      params: dict from sample_params.
      out: optional float32 [H, W, 3] C-contiguous array to write the result into (e.g. a slot of a batch
        array), which saves allocating one: fresh 768 KB arrays can cost page faults (~0.5 ms per 256x256
        view) when the allocator keeps returning freed memory to the system. Must not overlap image.

    Returns:
      float32 [H, W, 3] normalised image (out, or a new array) and float32 [4] box.
    """
    # The result lives in one buffer, updated in place by the pointwise ops; blur and flip, which cannot run
    # in place, go through this thread's scratch buffer and back.
    image = np.asarray(image)
    if out is None:
        x = image.astype(np.float32)
    else:
        if out.dtype != np.float32 or out.shape != image.shape or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 {image.shape}, got {out.dtype} {out.shape}")
        x = out
        np.copyto(x, image)
    box = np.asarray(box, np.float32)
    apply = np.asarray(params["apply"]).tolist()
    if apply[0]:
        x = _jitter(x, params["factors"], params["order"], in_place=True)
    if apply[1]:
        x = cv2.transform(x, _LUMA_ROWS, dst=x)
    result, src = x, x
    if apply[2] or apply[3]:
        scratch = _scratch(x.shape)
        if apply[2] and apply[3]:
            _flip_into(_blur(x, params["sigma"], scratch), result)
        elif apply[2]:
            src = _blur(x, params["sigma"], scratch)
        else:
            src = _flip_into(x, scratch)
        if apply[3]:
            box = _flip_box(box, x.shape[1])
    return _normalize(src, dst=result), box


_SCRATCH = threading.local()


def _scratch(shape):
    """This thread's float32 work buffer of the given shape, reused across calls (never returned)."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    if shape not in buffers:
        if len(buffers) >= 4:  # a few image shapes at most in practice
            buffers.clear()
        buffers[shape] = np.empty(shape, np.float32)
    return buffers[shape]


def _flip_into(src, dst):
    return cv2.flip(src, 1, dst=dst)
