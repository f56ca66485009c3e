"""Drawing primitives of the embedded dataset: shape masks, texture patterns, backgrounds, colours.

All functions are numpy-only and take their randomness from an explicit np.random.Generator. Shapes are
defined on object coordinates (u, v) where the object's nominal radius is 1.
"""
import colorsys
from typing import Optional

import numpy as np

SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent")
TEXTURES = ("stripes", "checker", "dots", "waves", "gradient")


def shape_mask(shape: int, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    """Boolean mask of a shape centred at u = v = 0 with radius ~1.

    Args:
      shape: index into SHAPES.
      u, v: float object coordinates of equal (or broadcastable) shapes, e.g. [S, S].
      aspect: horizontal stretch (1 = isotropic), an instance attribute.

    Returns:
      bool array of the broadcast shape of u and v.
    """
    u = u / aspect
    name = SHAPES[shape]
    # Only what each shape needs is computed: the polar angle (arctan2) is the costliest term.
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    r = np.hypot(u, v)
    if name == "disc":
        return r <= 1.0
    if name == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if name == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.75)
    theta = np.arctan2(v, u)
    if name == "triangle":
        return r <= _polygon_radius(theta, 3)
    if name == "hexagon":
        return r <= _polygon_radius(theta, 6)
    return r <= 0.6 + 0.4 * np.cos(5 * theta)  # star


# The largest distance from the centre, in (u / aspect, v), of any point of any shape: the square's
# corner (0.8 * sqrt 2); the cross's arm ends reach sqrt(0.3^2 + 1) = 1.044, every other shape 1.
SHAPE_EXTENT = 0.8 * np.sqrt(2.0)


def _polygon_radius(theta: np.ndarray, sides: int) -> np.ndarray:
    """Boundary radius of a regular polygon with circumradius 1 at polar angle theta."""
    sector = 2 * np.pi / sides
    return np.cos(np.pi / sides) / np.cos(np.mod(theta, sector) - np.pi / sides)


def texture(kind: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pattern in [0, 1] whose family is fixed by `kind` and whose frequency/phase vary per instance.

    Args:
      kind: index into TEXTURES.
      u, v: float object coordinates of equal shapes, e.g. [S, S].
      rng: instance generator.

    Returns:
      float array of the shape of u, in [0, 1].
    """
    freq = rng.uniform(2.0, 5.0)
    phase = rng.uniform(0, 2 * np.pi)
    name = TEXTURES[kind]
    if name == "stripes":
        return 0.5 + 0.5 * np.sign(np.sin(freq * np.pi * u + phase))
    if name == "checker":
        return ((np.floor(freq * u + phase) + np.floor(freq * v)) % 2).astype(np.float64)
    if name == "dots":
        du = np.mod(freq * u + phase, 1.0) - 0.5
        dv = np.mod(freq * v, 1.0) - 0.5
        return (np.hypot(du, dv) < 0.3).astype(np.float64)
    if name == "waves":
        return 0.5 + 0.5 * np.sin(freq * np.pi * (u + 0.3 * np.sin(freq * v + phase)))
    return np.clip(0.5 + 0.5 * (u * np.cos(phase) + v * np.sin(phase)), 0, 1)  # gradient


def hsv_colour(h: float, s: float, v: float) -> np.ndarray:
    """An RGB colour (float [3], 0..255) from HSV in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def background(rng: np.random.Generator, size: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """A smooth two-colour field with blotches, like out-of-focus scenery.

    Args:
      rng: image generator.
      size: side in pixels.
      out: optional float64 [size, size, 3] array to fill (reused buffers spare the page faults of a fresh
        large allocation, a good part of the cost).

    Returns:
      float [size, size, 3] in 0..255 (`out` if given).
    """
    field = _smooth_noise(rng, size, cells=int(rng.integers(2, 6)))
    detail = _smooth_noise(rng, size, cells=int(rng.integers(8, 16)))
    hue = rng.random()
    low = hsv_colour(hue, rng.uniform(0.1, 0.6), rng.uniform(0.1, 0.5))
    high = hsv_colour((hue + rng.uniform(0.1, 0.5)) % 1.0, rng.uniform(0.1, 0.7), rng.uniform(0.5, 1.0))
    mix = np.clip(0.8 * field + 0.2 * detail, 0, 1)
    keep = 1 - mix
    canvas = np.empty((size, size, 3)) if out is None else out
    for c in range(3):  # one channel plane at a time: broadcasting over a last axis of 3 is slow
        canvas[..., c] = low[c] * keep + high[c] * mix
    return canvas


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise: a random [cells+1]^2 grid upsampled bilinearly to [size, size], in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0, cells, size)
    i0 = np.minimum(pos.astype(int), cells - 1)
    frac = pos - i0
    rows = grid[i0] * (1 - frac[:, None]) + grid[i0 + 1] * frac[:, None]  # [size, cells+1]
    return rows[:, i0] * (1 - frac[None, :]) + rows[:, i0 + 1] * frac[None, :]
