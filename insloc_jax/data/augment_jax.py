"""The MoCo-v2 pixel augmentation of augment.py in JAX, to run on the accelerator inside the jitted step.

Same definitions and parameters as augment.py (see its docstring); the parameters come with the batch
(pipeline augment_on="device": keys aug{v}_apply / _factors / _order / _sigma), so the result is the same
deterministic function of (seed, process index, position) as on the host, up to float rounding. This module
imports only JAX, so the training step can use it without TensorFlow.
"""
import jax
import jax.numpy as jnp
import numpy as np

# numpy, not jnp: module constants must not become device arrays (or tracers, if first imported mid-trace).
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
BLUR_RADIUS = 6


def gray(x):
    """Luma, float [H, W, 3] -> [H, W, 1]."""
    return jnp.sum(x * LUMA, axis=-1, keepdims=True)


def _blend(x, other, factor):
    return jnp.clip(factor * x + (1.0 - factor) * other, 0.0, 255.0)


def rgb_to_hsv(x):
    """RGB -> HSV for float [..., 3] with values >= 0; H and S in [0, 1], V in the input's scale."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc, minc = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
    chroma = maxc - minc
    safe = jnp.where(chroma > 0, chroma, 1.0)
    s = jnp.where(maxc > 0, chroma / jnp.where(maxc > 0, maxc, 1.0), 0.0)
    # Hue sector by which channel is the maximum (red wins ties, then green), in sixths of a turn.
    h = jnp.where(maxc == r, (g - b) / safe,
                  jnp.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = jnp.where(chroma > 0, jnp.mod(h / 6.0, 1.0), 0.0)
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv):
    """HSV -> RGB, inverse of rgb_to_hsv."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = jnp.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = jnp.mod(sector, 6).astype(jnp.int32)
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    r = jnp.choose(sector, [v, q, p, p, t, v], mode="clip")
    g = jnp.choose(sector, [t, v, v, q, p, p], mode="clip")
    b = jnp.choose(sector, [p, p, t, v, v, q], mode="clip")
    return jnp.stack([r, g, b], axis=-1)


def adjust_hue(x, shift):
    """Hue rotation by `shift` turns; x float [H, W, 3] in 0..255."""
    hsv = rgb_to_hsv(x)
    hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
    return jnp.clip(hsv_to_rgb(hsv), 0.0, 255.0)


def _blend_op(x, op, factor):
    """Brightness (op 0), contrast (1) or saturation (2) without branching: the blend target is selected."""
    luma = gray(x)
    target = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(luma), luma))
    return _blend(x, target, factor)


def color_jitter(x, factors, order):
    """Brightness, contrast, saturation, hue (op ids 0..3) applied in `order`; x float [H, W, 3].

    Under vmap a lax.switch would evaluate every branch, i.e. the costly hue op four times. Instead the
    three cheap blends run in order around a single hue op: blends listed before the hue id go first.
    """
    hue_at = jnp.argmax(order == 3)
    blends = order[jnp.argsort(order == 3, stable=True)[:3]]  # the blend ids, in their order
    for slot in range(3):
        x = jnp.where(slot < hue_at, _blend_op(x, blends[slot], factors[blends[slot]]), x)
    x = adjust_hue(x, factors[3])
    for slot in range(3):
        x = jnp.where(slot >= hue_at, _blend_op(x, blends[slot], factors[blends[slot]]), x)
    return x


def gaussian_blur(x, sigma):
    """Separable 13-tap Gaussian with reflected borders, as augment.gaussian_blur; x float [H, W, 3]."""
    taps = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * jnp.square(taps / sigma))
    kernel = kernel / jnp.sum(kernel)
    height, width = x.shape[0], x.shape[1]
    padded = jnp.pad(x, ((BLUR_RADIUS, BLUR_RADIUS), (BLUR_RADIUS, BLUR_RADIUS), (0, 0)), mode="reflect")
    rows = sum(kernel[k] * padded[k:k + height] for k in range(2 * BLUR_RADIUS + 1))
    return sum(kernel[k] * rows[:, k:k + width] for k in range(2 * BLUR_RADIUS + 1))


def augment(image, box, apply, factors, order, sigma):
    """One view: jitter, grayscale, blur, flip, normalise.

    Args:
      image: uint8 [H, W, 3].
      box: float32 [4] xyxy.
      apply: bool [4] (jitter, gray, blur, flip); factors: float32 [4]; order: int32 [4]; sigma: scalar.

    Returns:
      float32 [H, W, 3] normalised image and float32 [4] box.
    """
    x = image.astype(jnp.float32)
    x = jnp.where(apply[0], color_jitter(x, factors, order), x)
    x = jnp.where(apply[1], jnp.broadcast_to(gray(x), x.shape), x)
    x = jnp.where(apply[2], gaussian_blur(x, sigma), x)
    width = x.shape[1]
    flipped_box = jnp.stack([width - box[2], box[1], width - box[0], box[3]])
    x = jnp.where(apply[3], x[:, ::-1], x)
    box = jnp.where(apply[3], flipped_box, box)
    return (x - MEAN) / STD, box


def augment_views(batch, view: int):
    """Augments view 1 or 2 of a pipeline batch (augment_on="device") with any leading dims.

    Args:
      batch: dict with image{v} uint8 [..., H, W, 3], boxes{v} [..., 4] and aug{v}_* parameters.
      view: 1 or 2.

    Returns:
      (float32 [..., H, W, 3] normalised images, float32 [..., 4] boxes).
    """
    images = batch[f"image{view}"]
    lead = images.shape[:-3]
    keys = (f"boxes{view}", f"aug{view}_apply", f"aug{view}_factors", f"aug{view}_order", f"aug{view}_sigma")
    args = [images.reshape((-1,) + images.shape[-3:])]
    args += [jnp.reshape(batch[k], (-1,) + batch[k].shape[len(lead):]) for k in keys]
    out, boxes = jax.vmap(augment)(*args)
    return out.reshape(lead + out.shape[1:]), boxes.reshape(lead + (4,))
