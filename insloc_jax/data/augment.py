"""MoCo-v2 pixel augmentation and flip as tf graph functions (one image at a time, inside tf.data).

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
the largest sigma, 2.0), i.e. a fixed 13-tap kernel, with reflected borders.

The random decisions are drawn by `sample_params` from a stateless seed, separately from the pixel ops, so
the same parameters can be applied here or by `augment_jax` on the accelerator.
"""
import tensorflow as tf

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
LUMA = (0.299, 0.587, 0.114)
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
SIGMA_RANGE = (0.1, 2.0)
BLUR_RADIUS = 6
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def sample_params(seed):
    """Draws the augmentation parameters of one view.

    Args:
      seed: int32 [2] stateless seed.

    Returns:
      dict of tensors: apply (bool [4]: jitter, gray, blur, flip), factors (float32 [4]: brightness,
      contrast, saturation factors and hue shift), order (int32 [4]: op ids in application order),
      sigma (float32 scalar).
    """
    s_apply, s_factor, s_order, s_sigma = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    apply = tf.random.stateless_uniform([4], s_apply) < tf.constant([P_JITTER, P_GRAY, P_BLUR, P_FLIP])
    u = tf.random.stateless_uniform([4], s_factor)
    strength = tf.constant(JITTER)
    # Factors in [1 - s, 1 + s] for the three blends (never negative for s <= 1); hue shift in [-s, s].
    factors = tf.where(tf.range(4) < HUE, 1.0 - strength + 2.0 * strength * u, strength * (2.0 * u - 1.0))
    order = tf.cast(tf.argsort(tf.random.stateless_uniform([4], s_order)), tf.int32)
    sigma = tf.random.stateless_uniform([], s_sigma, SIGMA_RANGE[0], SIGMA_RANGE[1])
    return {"apply": apply, "factors": factors, "order": order, "sigma": sigma}


def gray(image):
    """Luma, float [H, W, 3] -> [H, W, 1]."""
    # Channel slices and scalar products run about 3x faster on CPU than a broadcast multiply + reduce.
    r, g, b = tf.unstack(image, axis=-1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b)[..., None]


def _blend(image, other, factor):
    return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 255.0)


def adjust_brightness(image, factor):
    """Brightness: blend with black. image float [H, W, 3] in 0..255."""
    return _blend(image, tf.zeros_like(image), factor)


def adjust_contrast(image, factor):
    """Contrast: blend with the image's mean gray level (a scalar)."""
    return _blend(image, tf.reduce_mean(gray(image)), factor)


def adjust_saturation(image, factor):
    """Saturation: blend with the per-pixel gray image."""
    return _blend(image, gray(image), factor)


def adjust_hue(image, shift):
    """Hue rotation by `shift` turns in HSV (shift in [-0.5, 0.5]); HSV is scale-free so 0..255 works."""
    return tf.clip_by_value(tf.image.adjust_hue(image, shift), 0.0, 255.0)


def color_jitter(image, factors, order):
    """The four jitter ops in the given order.

    Args:
      image: float32 [H, W, 3] in 0..255.
      factors: float32 [4], see sample_params.
      order: int32 [4] op ids (BRIGHTNESS, CONTRAST, SATURATION, HUE) in application order.

    Returns:
      float32 [H, W, 3] in 0..255.
    """
    order = tf.convert_to_tensor(order, tf.int32)
    branches = [lambda x: adjust_brightness(x, factors[BRIGHTNESS]),
                lambda x: adjust_contrast(x, factors[CONTRAST]),
                lambda x: adjust_saturation(x, factors[SATURATION]),
                lambda x: adjust_hue(x, factors[HUE])]
    for position in range(4):
        image = tf.switch_case(order[position], [lambda f=f: f(image) for f in branches])
    return image


def gaussian_kernel(sigma, radius=BLUR_RADIUS):
    """Normalised 1-d Gaussian weights, float32 [2 * radius + 1]."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    weights = tf.exp(-0.5 * tf.square(x / sigma))
    return weights / tf.reduce_sum(weights)


def gaussian_blur(image, sigma):
    """Separable Gaussian blur with reflected borders, float [H, W, 3] -> [H, W, 3]."""
    kernel = gaussian_kernel(sigma)
    padded = tf.pad(image, [[BLUR_RADIUS, BLUR_RADIUS], [BLUR_RADIUS, BLUR_RADIUS], [0, 0]], "REFLECT")
    # Depthwise: each channel is blurred on its own, vertically then horizontally.
    column = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])  # [13, 1, 3, 1]
    row = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])  # [1, 13, 3, 1]
    x = tf.nn.depthwise_conv2d(padded[None], column, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, row, [1, 1, 1, 1], "VALID")
    return x[0]


def flip(image, box):
    """Horizontal flip of an [H, W, C] image and its float32 [4] xyxy box."""
    width = tf.cast(tf.shape(image)[1], tf.float32)
    # tf.reverse is about 10x faster than a negative-stride slice on CPU.
    return tf.reverse(image, [1]), tf.stack([width - box[2], box[1], width - box[0], box[3]])


def normalize(image):
    """Per-channel (x - mean) / std on RGB in 0..255."""
    return (image - tf.constant(MEAN)) / tf.constant(STD)


def augment(image, box, params):
    """Applies one view's augmentation.

    Args:
      image: uint8 [H, W, 3].
      box: float32 [4] xyxy.
      params: dict from sample_params.

    Returns:
      float32 [H, W, 3] normalised image and float32 [4] box.
    """
    x = tf.cast(image, tf.float32)
    apply = params["apply"]
    x = tf.cond(apply[0], lambda: color_jitter(x, params["factors"], params["order"]), lambda: x)
    x = tf.cond(apply[1], lambda: tf.tile(gray(x), [1, 1, 3]), lambda: x)
    x = tf.cond(apply[2], lambda: gaussian_blur(x, params["sigma"]), lambda: x)
    x, box = tf.cond(apply[3], lambda: flip(x, box), lambda: (x, box))
    return normalize(x), box
