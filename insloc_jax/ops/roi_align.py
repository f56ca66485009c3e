"""RoIAlign with the exact semantics of `torchvision.ops.roi_align` (and mmcv's RoIAlign), in pure JAX.

Definition (per RoI r, output cell (p, q), channel c), everything in float32 (float64 in a float64 run):

    offset      = 0.5 if aligned else 0
    start       = box_xyxy * spatial_scale - offset          # per axis
    size        = (x2 - x1) * spatial_scale                   # max(size, 1) when not aligned
    bin         = size / out
    grid        = sampling_ratio if sampling_ratio > 0 else ceil(size / out)
    sample i    = start + p * bin + (i + 0.5) * bin / grid,   i = 0 .. grid-1
    out[r,p,q]  = mean over the grid_h x grid_w samples of bilinear(feature[b_r], y, x)

where `bilinear` returns 0 for a sample with y < -1 or y > H (x likewise), clamps a coordinate in [-1, 0]
to 0, and uses only the last row (column) beyond H - 1.

Implementation. The sample grid of a bin is the outer product of its y samples and its x samples, and the
bilinear weight of a sample factorises into a y part and an x part (validity included), so RoIAlign is
separable:

    out[r] = Wy[r] @ F[b_r] @ Wx[r]^T,   Wy[r]: [out_h, H],  Wx[r]: [out_w, W]

with Wy[r, p, h] the average over the bin's y samples of their bilinear weight on row h. The weights are
tiny (no channels). When every image has exactly one RoI (`batch_indices=None`, the InsLoc case) both
contractions are batched matmuls at f32 HIGHEST precision. With explicit
`batch_indices`, the first contraction gathers only the <= 2 * grid rows each output row taps. Neither path
builds an R x H x W x C tensor. The op is linear in the features, so autodiff gives the exact backward;
boxes are constants (no gradient), as in torchvision and mmcv.

Adaptive sampling under jit: the per-box grid ceil(size / out) is data dependent, so the samples are laid
out on a static grid of `max_grid` entries per bin side and the entries beyond a box's own grid are masked
out. The default bound, ceil(max(H, W) / min(out_h, out_w)), covers every box that lies inside the feature
map (plus the one-pixel minimum of `aligned=False`). A box whose own grid exceeds the bound (a box larger
than the map) is averaged over `max_grid` evenly spaced samples per bin side instead, i.e. it behaves as if
`sampling_ratio = max_grid` for that axis; pass a larger `max_grid` to keep such boxes exact.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import jax.numpy as jnp
from jax import lax

from insloc_jax.precision import wide

_HIGHEST = lax.Precision.HIGHEST


def _opaque_full(shape: Tuple[int, ...], value: float, dtype=jnp.float32) -> jnp.ndarray:
    """An array of `value` that XLA cannot see as a constant.

    XLA rewrites `x / c` for a constant c as `x * (1 / c)`, which is not correctly rounded: 27.5 / 14 comes
    out one ulp high and ceil(14 / 7) becomes 3. Dividing by an opaque array keeps IEEE division.
    """
    return lax.optimization_barrier(jnp.full(shape, value, dtype))


def _divide(x: jnp.ndarray, divisor: float) -> jnp.ndarray:
    """x / divisor with IEEE rounding under jit (see `_opaque_full`)."""
    return x / _opaque_full(x.shape, divisor, x.dtype)


def _grid_count(size: jnp.ndarray, out: int, sampling_ratio: int, max_grid: int) -> jnp.ndarray:
    """[R] samples per bin side: the fixed ratio, or ceil(size / out) clipped to [0, max_grid]."""
    if sampling_ratio > 0:
        return _opaque_full(size.shape, sampling_ratio, size.dtype)
    # Negative sizes (inverted boxes) give an empty grid, as torchvision's loops do.
    return jnp.clip(jnp.ceil(_divide(size, out)), 0.0, float(max_grid))


def default_max_grid(feature_hw: Tuple[int, int], output_size: Tuple[int, int]) -> int:
    """The static per-side bound on adaptive samples that covers every box inside the map.

    Args:
      feature_hw: (H, W) of the feature map.
      output_size: (out_h, out_w).

    Returns:
      ceil(max(H, W) / min(out_h, out_w)), at least 1.
    """
    return max(1, math.ceil(max(feature_hw) / min(output_size)))


def axis_samples(
    lo: jnp.ndarray,
    hi: jnp.ndarray,
    length: int,
    out: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    max_grid: int,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Bilinear taps of every sample of every output cell on one axis.

    Args:
      lo: [R] box start on this axis (x1 or y1), input-pixel coordinates.
      hi: [R] box end on this axis (x2 or y2).
      length: the feature map's size on this axis (H or W).
      out: output cells on this axis.
      spatial_scale: feature pixels per input pixel.
      sampling_ratio: samples per bin side; <= 0 for adaptive.
      aligned: pixel-centre half-offset (torchvision `aligned=True`).
      max_grid: static bound on the samples per bin side (used only when adaptive).

    Returns:
      (index, weight), both [R, out, 2 * G] with G = sampling_ratio or max_grid: the input row (column)
      each sample reads and its bilinear weight, already divided by the box's grid size and zero for
      masked or out-of-range samples. Summing weight * value over the last axis averages the cell.
    """
    offset = 0.5 if aligned else 0.0
    start = lo * spatial_scale - offset  # [R], in the boxes' dtype (float32; float64 in a float64 run)
    end = hi * spatial_scale - offset
    size = end - start
    if not aligned:
        size = jnp.maximum(size, 1.0)
    bin_size = _divide(size, out)  # [R]
    count = _grid_count(size, out, sampling_ratio, max_grid)[:, None, None]  # [R, 1, 1], may be 0
    grid = jnp.maximum(count, 1.0)
    slots = sampling_ratio if sampling_ratio > 0 else max_grid
    cell = jnp.arange(out, dtype=start.dtype)[None, :, None]  # [1, out, 1]
    slot = jnp.arange(slots, dtype=start.dtype)[None, None, :]  # [1, 1, G]
    # Same operation order as torchvision so that sample positions agree to the last bit. The barrier keeps
    # XLA from fusing `start + cell * step` into one fused multiply-add: its single rounding moves far-away
    # samples by an ulp, which at coordinates ~30 shifts outputs by ~1e-5.
    step = bin_size[:, None, None]
    offset_of_cell = lax.optimization_barrier(cell * step)  # [R, out, 1]
    pos = start[:, None, None] + offset_of_cell + (slot + 0.5) * step / grid  # [R, out, G]
    used = slot < count  # [R, 1, G]
    inside = (pos >= -1.0) & (pos <= length)
    keep = (used & inside).astype(start.dtype) / grid  # [R, out, G]
    pos = jnp.maximum(pos, 0.0)
    low = jnp.floor(pos)
    at_edge = low >= length - 1
    low = jnp.where(at_edge, float(length - 1), low)
    frac = jnp.where(at_edge, 0.0, pos - low)
    high = jnp.where(at_edge, low, low + 1.0)
    index = jnp.concatenate([low, high], axis=-1).astype(jnp.int32)  # [R, out, 2G]
    weight = jnp.concatenate([(1.0 - frac) * keep, frac * keep], axis=-1)  # [R, out, 2G]
    return index, weight


def dense_axis_weights(index: jnp.ndarray, weight: jnp.ndarray, length: int) -> jnp.ndarray:
    """Scatters the taps of `axis_samples` into a dense [R, out, length] averaging matrix.

    Args:
      index: [R, out, T] int taps.
      weight: [R, out, T] their weights.
      length: the axis length.

    Returns:
      [R, out, length] float32; tiny (no channels), so the one-hot sum is cheap.
    """
    onehot = index[..., None] == jnp.arange(length, dtype=index.dtype)  # [R, out, T, length]
    return jnp.sum(onehot * weight[..., None], axis=2)


def _pool_rows(
    features: jnp.ndarray,
    row_index: jnp.ndarray,
    row_weight: jnp.ndarray,
    batch_indices: Optional[jnp.ndarray],
) -> jnp.ndarray:
    """Contracts the H axis: [R, out_h, W, C], cell p of RoI r = sum of its taps' rows of F[b_r].

    With `batch_indices=None` (RoI r belongs to image r) this is one batched matmul against the dense
    [R, out_h, H] weights. Otherwise only the 2 * G rows each cell taps are gathered (a [R, out_h, 2G, W, C]
    gather that XLA fuses into the weighted sum), so no RoI receives a copy of its whole feature map.
    """
    if batch_indices is None:
        wy = dense_axis_weights(row_index, row_weight, features.shape[1])  # [R, out_h, H]
        return jnp.einsum("rph,rhwc->rpwc", wy, features, precision=_HIGHEST)
    image = batch_indices.astype(jnp.int32)[:, None, None]  # [R, 1, 1]
    rows = features[image, row_index]  # [R, out_h, 2G, W, C]
    return jnp.einsum("rpt,rptwc->rpwc", row_weight, rows, precision=_HIGHEST)


def roi_align(
    features: jnp.ndarray,
    boxes_xyxy: jnp.ndarray,
    batch_indices: Optional[jnp.ndarray],
    output_size: Union[int, Sequence[int]],
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
    max_grid: Optional[int] = None,
) -> jnp.ndarray:
    """RoIAlign, as `torchvision.ops.roi_align` on NHWC features.

    Args:
      features: [N, H, W, C] feature maps, any float dtype.
      boxes_xyxy: [R, 4] boxes (x1, y1, x2, y2) in input-pixel coordinates.
      batch_indices: [R] int image index of each box, or None when R == N and box r belongs to image r
        (the InsLoc case; skips the image selection entirely).
      output_size: out or (out_h, out_w).
      spatial_scale: feature pixels per input pixel (1/stride).
      sampling_ratio: samples per bin side; <= 0 means adaptive, ceil(box size / out) per box and axis.
      aligned: subtract the half-pixel offset (torchvision `aligned=True`, mmcv `aligned=True`).
      max_grid: static bound on adaptive samples per bin side; defaults to `default_max_grid`.

    Returns:
      [R, out_h, out_w, C] in the features' dtype.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    _, height, width, _ = features.shape
    if max_grid is None:
        max_grid = default_max_grid((height, width), (out_h, out_w))
    if batch_indices is None and boxes_xyxy.shape[0] != features.shape[0]:
        raise ValueError(
            f"batch_indices=None needs one box per image, got {boxes_xyxy.shape[0]} boxes for "
            f"{features.shape[0]} images; pass batch_indices."
        )
    work = wide(features.dtype)  # float32 (float64 in a float64 run), whatever the features' dtype
    boxes = lax.stop_gradient(boxes_xyxy.astype(work))
    common = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned, max_grid=max_grid)
    row_index, row_weight = axis_samples(boxes[:, 1], boxes[:, 3], height, out_h, **common)  # [R, out_h, 2G]
    col_index, col_weight = axis_samples(boxes[:, 0], boxes[:, 2], width, out_w, **common)  # [R, out_w, 2G]
    wx = dense_axis_weights(col_index, col_weight, width)  # [R, out_w, W]
    rows = _pool_rows(features.astype(work), row_index, row_weight, batch_indices)  # [R, out_h, W, C]
    pooled = jnp.einsum("rqw,rpwc->rpqc", wx, rows, precision=_HIGHEST)  # [R, out_h, out_w, C]
    return pooled.astype(features.dtype)
