"""Box operations for InsLoc's box augmentation: IoU, the anchor grid, fixed-size NMS and the sampler.

All boxes are `boxes_xyxy` float32 [x1, y1, x2, y2] in input-pixel coordinates, with mmdetection 2.x's
continuous convention (width = x2 - x1, no +1). Everything is jittable and vmappable; shapes are static.

Box augmentation (REFERENCE section 2): the query encoder's P5 box is replaced by a random anchor near the
true box: the candidates are the anchors with IoU > 0.5 against it (or, if there are none, the
`fallback_top_k` anchors of highest IoU); each candidate gets a uniform random score, greedy NMS at IoU 0.7
keeps a subset, and one survivor chosen uniformly at random is the new box.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# mmdetection's guard against empty unions in `bbox_overlaps`.
_UNION_EPS = 1e-6


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """Areas of boxes [..., 4] -> [...]; inverted boxes have area 0."""
    return jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)


def pairwise_iou(boxes_a: jnp.ndarray, boxes_b: jnp.ndarray) -> jnp.ndarray:
    """Intersection over union of every pair.

    Args:
      boxes_a: [N, 4] boxes_xyxy.
      boxes_b: [M, 4] boxes_xyxy.

    Returns:
      [N, M] float32 IoU, with the union floored at 1e-6 as mmdetection does.
    """
    a = boxes_a.astype(jnp.float32)[:, None, :]  # [N, 1, 4]
    b = boxes_b.astype(jnp.float32)[None, :, :]  # [1, M, 4]
    top_left = jnp.maximum(a[..., :2], b[..., :2])  # [N, M, 2]
    bottom_right = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(bottom_right - top_left, 0.0)
    inter = wh[..., 0] * wh[..., 1]  # [N, M]
    union = box_area(a) + box_area(b) - inter
    return inter / jnp.maximum(union, _UNION_EPS)


def anchor_grid(
    canvas_hw: Tuple[int, int],
    stride: int = 16,
    base_size: int = 16,
    scales: Sequence[float] = (2, 4, 8, 16),
    ratios: Sequence[float] = (0.5, 0.75, 1.0, 1.5, 2.0),
) -> np.ndarray:
    """The anchors of one feature level, in mmdetection 2.x order and geometry.

    Anchor centres lie at (stride * x, stride * y) for x < ceil(W / stride), y < ceil(H / stride) (centre
    offset 0); each position has len(ratios) * len(scales) anchors, ratio-major then scale (mmdetection's
    `scale_major=True`), of width base * scale / sqrt(ratio) and height base * scale * sqrt(ratio), where
    ratio = height / width. Anchors are not clipped to the canvas. Positions are row-major (y outer).

    Args:
      canvas_hw: (H, W) of the input canvas.
      stride: distance between anchor centres in pixels.
      base_size: the anchor side at scale 1 and ratio 1.
      scales: anchor scales.
      ratios: height / width ratios.

    Returns:
      [positions * len(ratios) * len(scales), 4] float32 numpy array (a constant, built once on the host).
    """
    ratios_arr = np.asarray(ratios, np.float64)
    scales_arr = np.asarray(scales, np.float64)
    h_ratio = np.sqrt(ratios_arr)
    widths = (base_size / h_ratio[:, None] * scales_arr[None, :]).reshape(-1)  # [A]
    heights = (base_size * h_ratio[:, None] * scales_arr[None, :]).reshape(-1)
    base = np.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights], axis=-1)  # [A, 4]
    rows = -(-canvas_hw[0] // stride)
    cols = -(-canvas_hw[1] // stride)
    ys, xs = np.meshgrid(np.arange(rows) * stride, np.arange(cols) * stride, indexing="ij")
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)  # [P, 1, 4]
    return (shifts + base[None]).reshape(-1, 4).astype(np.float32)


def nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    iou_threshold: float,
    valid: Optional[jnp.ndarray] = None,
) -> jnp.ndarray:
    """Greedy non-maximum suppression with static shapes.

    Repeatedly keeps the highest-scoring remaining box and removes every remaining box whose IoU with it
    exceeds `iou_threshold` (strictly), as torchvision and mmcv do. One loop iteration per kept box, each
    O(N): no N x N matrix is built, so it scales to thousands of boxes.

    Args:
      boxes: [N, 4] boxes_xyxy.
      scores: [N] float scores; ties go to the lower index.
      iou_threshold: suppression threshold.
      valid: optional [N] bool; invalid boxes are neither kept nor suppress anything.

    Returns:
      [N] bool mask of the kept boxes.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    remaining = jnp.ones(scores.shape, bool) if valid is None else jnp.asarray(valid, bool)
    kept = jnp.zeros(scores.shape, bool)

    def step(carry):
        remaining, kept = carry
        best = jnp.argmax(jnp.where(remaining, scores, -jnp.inf))
        overlaps = pairwise_iou(boxes[best][None], boxes)[0]  # [N]
        kept = kept.at[best].set(True)
        remaining = remaining & (overlaps <= iou_threshold)
        return remaining.at[best].set(False), kept

    _, kept = lax.while_loop(lambda carry: jnp.any(carry[0]), step, (remaining, kept))
    return kept


def candidate_mask(ious: jnp.ndarray, iou_threshold: float, fallback_top_k: int) -> jnp.ndarray:
    """Which anchors are candidates for one true box.

    Args:
      ious: [A] IoU of every anchor with the true box.
      iou_threshold: anchors with IoU strictly above it are candidates.
      fallback_top_k: if no anchor qualifies, the k anchors of highest IoU (ties to the lower index).

    Returns:
      [A] bool.
    """
    above = ious > iou_threshold
    k = min(fallback_top_k, ious.shape[0])
    _, top = lax.top_k(ious, k)
    top_k = jnp.zeros(ious.shape, bool).at[top].set(True)
    return jnp.where(jnp.any(above), above, top_k)


def sample_augmented_box(
    rng: jax.Array,
    box_xyxy: jnp.ndarray,
    anchors: jnp.ndarray,
    iou_threshold: float = 0.5,
    nms_threshold: float = 0.7,
    fallback_top_k: int = 4000,
) -> jnp.ndarray:
    """Box augmentation for one image: a random NMS survivor among the anchors around the true box.

    Args:
      rng: PRNG key.
      box_xyxy: [4] the true box.
      anchors: [A, 4] the anchor grid (see `anchor_grid`).
      iou_threshold: candidate threshold on IoU with the true box.
      nms_threshold: NMS IoU threshold among the candidates.
      fallback_top_k: candidates when no anchor passes `iou_threshold`.

    Returns:
      [4] float32, one of the anchors. Use `jax.vmap` over (rng, box_xyxy) for a batch.
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    score_key, pick_key = jax.random.split(rng)
    ious = pairwise_iou(box_xyxy[None], anchors)[0]  # [A]
    candidates = candidate_mask(ious, iou_threshold, fallback_top_k)
    scores = jax.random.uniform(score_key, ious.shape)
    survivors = nms(anchors, scores, nms_threshold, valid=candidates)
    # Uniform over the survivors: the survivor with the largest independent uniform draw.
    draw = jax.random.uniform(pick_key, ious.shape)
    choice = jnp.argmax(jnp.where(survivors, draw, -1.0))
    return anchors[choice]
