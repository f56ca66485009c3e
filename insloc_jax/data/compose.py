"""Copy-paste composition (REFERENCE section 1) and the MoCo-v2 whole-image view, as numpy/OpenCV/PIL functions.

One InsLoc view of a foreground image is made in two steps so that the expensive part does not depend on
the background:
  1. `foreground`: RandomResizedCrop-style crop (area U(0.2, 1), aspect exp(U(log 0.5, log 2)), 10 tries,
     else centre crop), rescale keeping the aspect ratio to fit a target (w, h) with w, h uniform integers
     in fg_size_range (high end exclusive), and place it at a uniformly random top-left corner where it
     fits in the canvas. Returns the rescaled patch (only the patch: no canvas-sized layer) and its box.
  2. `paste`: hard overwrite of the box region of (a copy of) a canvas-sized background with the patch.
All randomness comes from an explicit `np.random.Generator` per view (the caller makes it from a stateless
seed); each function documents the order of its draws, so a generator in a given state always gives the
same view. Nothing here touches numpy's global random state. Crops are resized bilinearly with half-pixel
centres and no antialiasing (cv2.INTER_LINEAR, as in the original mmcv pipeline); the MoCo view uses PIL's
antialiased BILINEAR resize, as torchvision's RandomResizedCrop does on PIL images.
"""
import math

import cv2
import numpy as np
from PIL import Image

CROP_SCALE = (0.2, 1.0)
INSLOC_LOG_RATIO = (math.log(0.5), math.log(2.0))
MOCO_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))  # torchvision RandomResizedCrop default


def sample_crop(rng, height, width, scale=CROP_SCALE, log_ratio=INSLOC_LOG_RATIO, tries=10):
    """RandomResizedCrop's crop window, torchvision's algorithm with all tries drawn at once.

    Draws, in this order: u = rng.random((tries, 2)) (column 0: area fraction, column 1: log aspect), then
    top = rng.integers(0, height - crop_h + 1) and left = rng.integers(0, width - crop_w + 1). top and left
    are drawn even when no try fits (they are then discarded for the centre crop), so every call consumes
    the same draws.

    Args:
      rng: np.random.Generator of this view.
      height, width: image size.
      scale: range of the crop's area fraction.
      log_ratio: range of log(width / height) of the crop.
      tries: attempts before falling back to a centre crop.

    Returns:
      python ints (top, left, crop_height, crop_width).
    """
    height, width = int(height), int(width)
    u = rng.random((tries, 2))
    area = float(height * width)
    crop = None
    for u_area, u_ratio in u.tolist():
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        # python's round() rounds half to even, as torchvision does.
        crop_w = round(math.sqrt(target_area * ratio))
        crop_h = round(math.sqrt(target_area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            crop = crop_h, crop_w
            break
    found = crop is not None
    crop_h, crop_w = crop if found else _centre_crop_size(height, width, log_ratio)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    if not found:
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return top, left, crop_h, crop_w


def _centre_crop_size(height, width, log_ratio):
    """torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio."""
    in_ratio = width / height
    lo, hi = math.exp(log_ratio[0]), math.exp(log_ratio[1])
    if in_ratio < lo:
        return round(width / lo), width
    if in_ratio > hi:
        return height, round(height * hi)
    return height, width


def fit_size(crop_h, crop_w, target_w, target_h):
    """Size of the crop rescaled, aspect kept, so long edge <= max(w, h) and short edge <= min(w, h).

    Args:
      crop_h, crop_w: crop size.
      target_w, target_h: the drawn target size.

    Returns:
      python ints (new_h, new_w), each >= 1.
    """
    ch, cw, tw, th = float(crop_h), float(crop_w), float(target_w), float(target_h)
    factor = min(max(tw, th) / max(ch, cw), min(tw, th) / min(ch, cw))
    # mmcv rounds with int(x + 0.5); the exact product never exceeds the integer bound, so rounding keeps
    # the edges within the target.
    return max(int(ch * factor + 0.5), 1), max(int(cw * factor + 0.5), 1)


def resize_uint8(image, size, antialias=False):
    """Bilinear resize (half-pixel centres) of uint8 [H, W, 3] to size = (h, w), uint8 [h, w, 3].

    antialias=False is cv2.INTER_LINEAR (no antialiasing; the InsLoc pipeline, as mmcv). antialias=True is
    PIL's BILINEAR resize, whose filter widens when shrinking (what torchvision's RandomResizedCrop does on
    PIL images; the MoCo pipeline). The input may be a strided slice (a crop window): it is not copied for
    cv2; for PIL it is copied to a contiguous array first (5x faster than PIL's own strided import).
    """
    out_h, out_w = int(size[0]), int(size[1])
    if antialias:
        resized = Image.fromarray(np.ascontiguousarray(image)).resize((out_w, out_h), Image.BILINEAR)
        return np.array(resized)  # np.asarray would be read-only
    return cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)


def foreground(image, rng, canvas_size=256, fg_size_range=(128, 255)):
    """The rescaled foreground crop and where it goes on the canvas (step 1 of one InsLoc view).

    Draws, in this order: the crop window (sample_crop: tries x 2 floats, top, left), the target size
    (target_w, target_h) = rng.integers(low, high, size=2), then the paste corner y =
    rng.integers(0, S - new_h + 1) and x = rng.integers(0, S - new_w + 1).

    Args:
      image: uint8 [H, W, 3] foreground image.
      rng: np.random.Generator of this view.
      canvas_size: side S of the square canvas.
      fg_size_range: (low, high) of the target size; integers in [low, high). high <= S.

    Returns:
      patch: uint8 [new_h, new_w, 3], the resized crop.
      box: float32 [4] = (x1, y1, x2, y2) in canvas pixels (integer-valued), x2 - x1 = new_w.
    """
    top, left, crop_h, crop_w = sample_crop(rng, image.shape[0], image.shape[1])
    target_w, target_h = rng.integers(fg_size_range[0], fg_size_range[1], size=2).tolist()
    new_h, new_w = fit_size(crop_h, crop_w, target_w, target_h)
    patch = resize_uint8(image[top:top + crop_h, left:left + crop_w], (new_h, new_w))
    y = int(rng.integers(0, canvas_size - new_h + 1))
    x = int(rng.integers(0, canvas_size - new_w + 1))
    return patch, np.array([x, y, x + new_w, y + new_h], np.float32)


def paste(patch, box, background, out=None):
    """Hard overwrite of the box region of a copy of background with patch (step 2 of one InsLoc view).

    Args:
      patch: uint8 [h, w, 3] from foreground.
      box: float32 [4] its box (integer-valued), x2 - x1 = w and y2 - y1 = h.
      background: uint8 [S, S, 3], already resized to the canvas. Not modified (backgrounds are shared).
      out: optional uint8 [S, S, 3] array to write the composite into (e.g. a slot of a batch array)
        instead of a new one; must not overlap background.

    Returns:
      uint8 [S, S, 3] composite: out, or a new array.
    """
    x1, y1, x2, y2 = (int(v) for v in np.asarray(box).tolist())
    if patch.shape[:2] != (y2 - y1, x2 - x1):
        raise ValueError(f"patch of shape {patch.shape} does not fill box {box}")
    if out is None:
        out = background.copy()
    else:
        out[...] = background
    out[y1:y2, x1:x2] = patch
    return out


def moco_view(image, rng, size=224):
    """MoCo-v2 view: RandomResizedCrop(size, scale 0.2..1, ratio 3/4..4/3) of the whole image.

    Draws as sample_crop (tries x 2 floats, top, left) and nothing else.

    Args:
      image: uint8 [H, W, 3].
      rng: np.random.Generator of this view.
      size: output side.

    Returns:
      uint8 [size, size, 3] view and float32 [4] box covering the whole view.
    """
    top, left, h, w = sample_crop(rng, image.shape[0], image.shape[1], log_ratio=MOCO_LOG_RATIO)
    view = resize_uint8(image[top:top + h, left:left + w], (size, size), antialias=True)
    return view, np.array([0.0, 0.0, size, size], np.float32)
