"""Copy-paste composition (REFERENCE section 1) and the MoCo-v2 whole-image view, as tf graph functions.

One InsLoc view of a foreground image is made in two steps so that the expensive part does not depend on
the background:
  1. `foreground_layer`: RandomResizedCrop-style crop (area U(0.2, 1), aspect exp(U(log 0.5, log 2)),
     10 tries, else centre crop), rescale keeping the aspect ratio to fit a target (w, h) with w, h uniform
     integers in fg_size_range (high end exclusive), and place it at a uniformly random top-left corner
     where it fits in the canvas. Returns the canvas-sized layer and its box.
  2. `paste`: hard overwrite of the box region of a canvas-sized background with the layer.
All randomness comes from explicit stateless seeds. Crops are resized bilinearly with half-pixel centres
and no antialiasing, like cv2.INTER_LINEAR in the original mmcv pipeline.
"""
import math

import tensorflow as tf

CROP_SCALE = (0.2, 1.0)
INSLOC_LOG_RATIO = (math.log(0.5), math.log(2.0))
MOCO_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))  # torchvision RandomResizedCrop default


def sample_crop(seed, height, width, scale=CROP_SCALE, log_ratio=INSLOC_LOG_RATIO, tries=10):
    """RandomResizedCrop's crop window, torchvision's algorithm with all tries drawn at once.

    Args:
      seed: int32 [2] stateless seed.
      height, width: int32 scalars, image size.
      scale: range of the crop's area fraction.
      log_ratio: range of log(width / height) of the crop.
      tries: attempts before falling back to a centre crop.

    Returns:
      int32 [4]: (top, left, crop_height, crop_width).
    """
    seed_try, seed_top, seed_left = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    u = tf.random.stateless_uniform([tries, 2], seed_try, dtype=tf.float32)
    area = tf.cast(height * width, tf.float32)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0])  # [tries]
    ratio = tf.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, 1])
    # tf.round rounds half to even, like python's round() used by torchvision.
    crop_w = tf.cast(tf.round(tf.sqrt(target_area * ratio)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(target_area / ratio)), tf.int32)
    ok = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
    first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
    fb_h, fb_w = _centre_crop_size(height, width, log_ratio)
    h = tf.where(tf.reduce_any(ok), crop_h[first], fb_h)
    w = tf.where(tf.reduce_any(ok), crop_w[first], fb_w)
    top = tf.random.stateless_uniform([], seed_top, 0, height - h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seed_left, 0, width - w + 1, dtype=tf.int32)
    fallback_top, fallback_left = (height - h) // 2, (width - w) // 2
    top = tf.where(tf.reduce_any(ok), top, fallback_top)
    left = tf.where(tf.reduce_any(ok), left, fallback_left)
    return tf.stack([top, left, h, w])


def _centre_crop_size(height, width, log_ratio):
    """torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio."""
    in_ratio = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
    lo, hi = math.exp(log_ratio[0]), math.exp(log_ratio[1])
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    h = tf.where(in_ratio < lo, tf.round(w_f / lo), h_f)
    w = tf.where(in_ratio > hi, tf.round(h_f * hi), w_f)
    return tf.cast(h, tf.int32), tf.cast(w, tf.int32)


def fit_size(crop_h, crop_w, target_w, target_h):
    """Size of the crop rescaled, aspect kept, so long edge <= max(w, h) and short edge <= min(w, h).

    Args:
      crop_h, crop_w: int32 scalars, crop size.
      target_w, target_h: int32 scalars, the drawn target size.

    Returns:
      int32 (new_h, new_w), each >= 1.
    """
    ch, cw = tf.cast(crop_h, tf.float32), tf.cast(crop_w, tf.float32)
    tw, th = tf.cast(target_w, tf.float32), tf.cast(target_h, tf.float32)
    factor = tf.minimum(tf.maximum(tw, th) / tf.maximum(ch, cw), tf.minimum(tw, th) / tf.minimum(ch, cw))
    # mmcv rounds with int(x + 0.5); the exact product never exceeds the integer bound, so rounding keeps
    # the edges within the target.
    new_h = tf.cast(tf.floor(ch * factor + 0.5), tf.int32)
    new_w = tf.cast(tf.floor(cw * factor + 0.5), tf.int32)
    return tf.maximum(new_h, 1), tf.maximum(new_w, 1)


def resize_uint8(image, size, antialias=False):
    """Bilinear resize (half-pixel centres) of uint8 [H, W, 3] to size, back to uint8.

    antialias=False samples like cv2.INTER_LINEAR (the InsLoc pipeline); antialias=True widens the filter
    when shrinking, like PIL's BILINEAR used by torchvision's RandomResizedCrop (the MoCo pipeline).
    """
    out = tf.image.resize(image, size, method="bilinear", antialias=antialias)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def foreground_layer(image, seed, canvas_size=256, fg_size_range=(128, 255)):
    """The rescaled foreground crop placed on an empty canvas (step 1 of one InsLoc view).

    Args:
      image: uint8 [H, W, 3] foreground image.
      seed: int32 [2] stateless seed of this view.
      canvas_size: side S of the square canvas.
      fg_size_range: (low, high) of the target size; integers in [low, high). high <= S.

    Returns:
      layer: uint8 [S, S, 3], zero outside the box.
      box: float32 [4] = (x1, y1, x2, y2) in canvas pixels.
    """
    seed_crop, seed_size, seed_paste = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shape = tf.shape(image)
    top, left, crop_h, crop_w = tf.unstack(sample_crop(seed_crop, shape[0], shape[1]))
    target = tf.random.stateless_uniform([2], seed_size, fg_size_range[0], fg_size_range[1], tf.int32)
    new_h, new_w = fit_size(crop_h, crop_w, target[0], target[1])
    crop = resize_uint8(image[top:top + crop_h, left:left + crop_w], tf.stack([new_h, new_w]))
    seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed_paste, 2))
    y = tf.random.stateless_uniform([], seed_y, 0, canvas_size - new_h + 1, dtype=tf.int32)
    x = tf.random.stateless_uniform([], seed_x, 0, canvas_size - new_w + 1, dtype=tf.int32)
    layer = tf.pad(crop, [[y, canvas_size - y - new_h], [x, canvas_size - x - new_w], [0, 0]])
    layer = tf.ensure_shape(layer, [canvas_size, canvas_size, 3])
    box = tf.cast(tf.stack([x, y, x + new_w, y + new_h]), tf.float32)
    return layer, box


def paste(layer, box, background):
    """Hard overwrite of the box region of background with layer (step 2 of one InsLoc view).

    Args:
      layer: uint8 [..., S, S, 3] from foreground_layer (any leading dims).
      box: float32 [..., 4] its box (integer-valued).
      background: uint8 [..., S, S, 3], already resized to the canvas.

    Returns:
      uint8 [..., S, S, 3] composite.
    """
    coords = tf.range(tf.shape(layer)[-2], dtype=tf.float32)
    b = box[..., None]  # [..., 4, 1]
    inside_x = (coords >= b[..., 0, :]) & (coords < b[..., 2, :])  # [..., S]
    inside_y = (coords >= b[..., 1, :]) & (coords < b[..., 3, :])
    mask = inside_y[..., :, None, None] & inside_x[..., None, :, None]  # [..., S, S, 1]
    return tf.where(mask, layer, background)


def moco_view(image, seed, size=224):
    """MoCo-v2 view: RandomResizedCrop(size, scale 0.2..1, ratio 3/4..4/3) of the whole image.

    Args:
      image: uint8 [H, W, 3].
      seed: int32 [2] stateless seed of this view.
      size: output side.

    Returns:
      uint8 [size, size, 3] view and float32 [4] box covering the whole view.
    """
    shape = tf.shape(image)
    top, left, h, w = tf.unstack(sample_crop(seed, shape[0], shape[1], log_ratio=MOCO_LOG_RATIO))
    view = resize_uint8(image[top:top + h, left:left + w], [size, size], antialias=True)
    return tf.ensure_shape(view, [size, size, 3]), tf.constant([0.0, 0.0, size, size], tf.float32)
