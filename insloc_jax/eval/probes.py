"""Frozen-feature probes as array-in / number-out functions (numpy, float64 where it matters).

Three probes, each testable on constructed features without a network:
  * instance retrieval: view-1 embedding of instance i should find view-2 embedding of instance i among all
    view-2 embeddings (cosine, top-1).
  * kNN classification: the similarity-weighted vote of InstDisc (Wu et al. 2018) that MoCo's kNN monitor
    also uses: the k most cosine-similar memory-bank entries vote for their label with weight
    exp(similarity / T), T = 0.07, and the class with the largest summed weight wins.
  * box regression: a linear map from the RoI features of a jittered box to the Fast R-CNN deltas
    (dx, dy, dw, dh) that move it onto the true box, fitted in closed form by ridge regression with the
    ridge strength chosen by exact leave-one-instance-out error on the fit set. Scored by the mean IoU of the
    corrected boxes with the true boxes, next to the mean IoU of the jittered boxes themselves and of the
    same probe fitted on the jittered box's own coordinates (`box_geometry`), the bar features must clear.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

KNN_K = 20
KNN_TEMPERATURE = 0.07
# Ridge strengths as multiples of n: after standardisation every column of X^T X has diagonal n.
RIDGE_GRID = tuple(10.0 ** np.arange(-4, 4))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length, [N, D] -> [N, D] float64."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def retrieval_hits(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Whether each query's most cosine-similar key is its own (query i belongs with key i).

    Args:
      queries: [N, D] view-1 features.
      keys: [N, D] view-2 features of the same N instances, in the same order.

    Returns:
      [N] bool; its mean is the top-1 accuracy (chance 1 / N).
    """
    sims = l2_normalize(queries) @ l2_normalize(keys).T  # [N, N]
    return np.argmax(sims, axis=1) == np.arange(len(queries))


def retrieval_top1(queries: np.ndarray, keys: np.ndarray) -> float:
    """Top-1 retrieval accuracy in [0, 1] (see `retrieval_hits`)."""
    return float(np.mean(retrieval_hits(queries, keys)))


def knn_predict(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, num_classes: int,
                k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """Similarity-weighted kNN labels (InstDisc / MoCo kNN monitor).

    Args:
      bank: [M, D] memory-bank features.
      bank_labels: [M] int labels in [0, num_classes).
      queries: [Q, D] query features.
      num_classes: C.
      k: neighbours that vote (at most M are used).
      temperature: T of the vote weight exp(cosine / T).

    Returns:
      [Q] int predicted labels.
    """
    k = min(k, len(bank))
    sims = l2_normalize(queries) @ l2_normalize(bank).T  # [Q, M]
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [Q, k]
    weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)  # [Q, k]
    votes = np.zeros((len(queries), num_classes))
    np.add.at(votes, (np.arange(len(queries))[:, None], np.asarray(bank_labels)[top]), weights)
    return np.argmax(votes, axis=1)


def knn_hits(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
             num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """[Q] bool: whether `knn_predict` gives each query its label (query_labels [Q])."""
    return knn_predict(bank, bank_labels, queries, num_classes, k, temperature) == np.asarray(query_labels)


def knn_top1(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
             num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Top-1 accuracy of `knn_predict` against query_labels [Q] (the mean of `knn_hits`)."""
    return float(np.mean(knn_hits(bank, bank_labels, queries, query_labels, num_classes, k, temperature)))


def box_deltas(boxes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Fast R-CNN deltas that move boxes onto targets, [N, 4] xyxy each -> [N, 4] (dx, dy, dw, dh)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    tw, th = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    tx, ty = targets[:, 0] + 0.5 * tw, targets[:, 1] + 0.5 * th
    return np.stack([(tx - cx) / w, (ty - cy) / h, np.log(tw / w), np.log(th / h)], axis=1)


def apply_deltas(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Inverse of `box_deltas`: [N, 4] xyxy boxes moved by [N, 4] deltas -> [N, 4] xyxy."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx = boxes[:, 0] + 0.5 * w + deltas[:, 0] * w
    cy = boxes[:, 1] + 0.5 * h + deltas[:, 1] * h
    nw, nh = w * np.exp(deltas[:, 2]), h * np.exp(deltas[:, 3])
    return np.stack([cx - 0.5 * nw, cy - 0.5 * nh, cx + 0.5 * nw, cy + 0.5 * nh], axis=1)


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a[i] with box b[i], [N, 4] xyxy each -> [N]."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def jitter_boxes(boxes: np.ndarray, seed: int, canvas_size: int, shift: float = 0.25,
                 max_scale: float = 1.5) -> np.ndarray:
    """Deterministically perturbed boxes: the probe's starting points.

    Each centre moves by U(-shift, shift) of the box's width (height), each side is scaled by
    exp(U(-log max_scale, log max_scale)); the result is clipped to the canvas and kept >= 2 px wide.

    Args:
      boxes: [N, 4] xyxy true boxes.
      seed: numpy seed of the perturbation.
      canvas_size: side of the square image the boxes live in.
      shift, max_scale: jitter strength.

    Returns:
      [N, 4] float64 jittered boxes.
    """
    rng = np.random.default_rng(seed)
    u = rng.uniform(-1.0, 1.0, (len(boxes), 4))
    deltas = np.concatenate([shift * u[:, :2], np.log(max_scale) * u[:, 2:]], axis=1)
    out = np.clip(apply_deltas(np.asarray(boxes, np.float64), deltas), 0.0, float(canvas_size))
    # A box squeezed against an edge by the clip is widened back inside the canvas.
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 2.0)
    out[:, :2] = np.minimum(out[:, :2], canvas_size - 2.0)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 2.0)
    return out


def box_geometry(boxes: np.ndarray, canvas_size: int) -> np.ndarray:
    """Where a box is, as probe features: [N, 4] xyxy -> [N, 6] (x1, y1, x2, y2, w, h) / canvas_size.

    The box probe's baseline: a ridge fit on these alone uses only the layout prior (where true boxes tend to
    be given where the jittered box is, e.g. clipped at the canvas edge), never what the image shows.
    """
    boxes = np.asarray(boxes, np.float64)
    return np.concatenate([boxes, boxes[:, 2:] - boxes[:, :2]], axis=1) / float(canvas_size)


def fit_ridge(x: np.ndarray, y: np.ndarray, grid: Sequence[float] = RIDGE_GRID,
              groups: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Closed-form ridge regression with an intercept, its strength chosen by held-out error.

    Columns of x are standardised with the fit set's mean and std. With the thin SVD x = U S V^T, every
    strength a gives the hat matrix H = U diag(s^2 / (s^2 + a)) U^T + 1/n (the intercept), and the exact
    residual of the rows of group g predicted by the fit without g is (I - H_gg)^-1 r_g: the whole grid
    costs one SVD. Without groups every row is its own group (leave-one-out, r_i / (1 - H_ii)); rows that
    share an instance must share a group, or the held-out error rewards memorising instances.

    Args:
      x: [N, D] features.
      y: [N, T] targets.
      grid: ridge strengths as multiples of N.
      groups: [N] group ids (e.g. the instance of each row), or None.

    Returns:
      {"mean": [D], "scale": [D], "weights": [D, T], "bias": [T], "alpha": scalar}; see `predict_ridge`.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    mean, scale = x.mean(0), np.maximum(x.std(0), 1e-8)
    xs = (x - mean) / scale
    bias = y.mean(0)
    yc = y - bias
    u, s, vt = np.linalg.svd(xs, full_matrices=False)  # [N, r], [r], [r, D]
    uty = u.T @ yc  # [r, T]
    best = None
    for alpha in np.asarray(grid) * n:
        shrink = s**2 / (s**2 + alpha)  # [r]
        residual = yc - u @ (shrink[:, None] * uty)  # [N, T]
        error = np.mean(_held_out_residuals(u, shrink, residual, groups) ** 2)
        if best is None or error < best[0]:
            best = (error, alpha)
    alpha = best[1]
    weights = vt.T @ ((s / (s**2 + alpha))[:, None] * uty)  # [D, T]
    return {"mean": mean, "scale": scale, "weights": weights, "bias": bias, "alpha": np.float64(alpha)}


def _held_out_residuals(u: np.ndarray, shrink: np.ndarray, residual: np.ndarray,
                        groups: Optional[np.ndarray]) -> np.ndarray:
    """[N, T] residuals of every row under the fit without its group (see `fit_ridge`)."""
    n = len(u)
    if groups is None:
        leverage = np.sum(u**2 * shrink, axis=1) + 1.0 / n  # diag(H)
        return residual / np.maximum(1.0 - leverage, 1e-9)[:, None]
    held_out = np.empty_like(residual)
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        hat = (u[rows] * shrink) @ u[rows].T + 1.0 / n  # H_gg
        held_out[rows] = np.linalg.solve(np.eye(len(rows)) - hat, residual[rows])
    return held_out


def predict_ridge(model: Dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Applies a `fit_ridge` model: [N, D] -> [N, T]."""
    return ((np.asarray(x, np.float64) - model["mean"]) / model["scale"]) @ model["weights"] + model["bias"]


def box_regression_ious(features: np.ndarray, jittered: np.ndarray, true_boxes: np.ndarray,
                        fit: np.ndarray, groups: Optional[np.ndarray] = None):
    """Fits deltas jittered -> true on the `fit` rows and corrects the other (scored) rows.

    Args:
      features: [N, D] RoI features of the jittered boxes.
      jittered: [N, 4] xyxy jittered boxes.
      true_boxes: [N, 4] xyxy true boxes.
      fit: [N] bool, rows used to fit (the rest are scored).
      groups: [N] instance of each row, so the ridge strength is chosen by leaving whole instances out
        (None: leave-one-out).

    Returns:
      (IoU of the jittered boxes [S], IoU of the corrected boxes [S], the chosen ridge strength), S = the
      scored rows in their original order.
    """
    fit = np.asarray(fit, bool)
    model = fit_ridge(features[fit], box_deltas(jittered[fit], true_boxes[fit]),
                      groups=None if groups is None else np.asarray(groups)[fit])
    score = ~fit
    corrected = apply_deltas(jittered[score], predict_ridge(model, features[score]))
    return (paired_iou(jittered[score], true_boxes[score]), paired_iou(corrected, true_boxes[score]),
            float(model["alpha"]))


def group_means(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """[N] values, [N] int group ids -> [G] mean per group, in increasing group id (G = distinct ids)."""
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    return np.bincount(index, weights=np.asarray(values, np.float64)) / np.bincount(index)


def paired_difference(baseline: np.ndarray, other: np.ndarray):
    """Mean of other - baseline over matched items, and its standard error.

    The two score the same items (the same held-out queries or instances), so the difference is taken per
    item first: what the items have in common (an easy query, a hard instance) cancels, and the standard
    error is that of the per-item differences, std(d, ddof=1) / sqrt(n).

    Args:
      baseline: [n] per-item scores (e.g. 0/1 hits of the untrained model).
      other: [n] the same items' scores under another model.

    Returns:
      (mean difference, standard error); the error is nan for fewer than 2 items.
    """
    a, b = np.asarray(baseline, np.float64), np.asarray(other, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two equally long vectors, got {a.shape} and {b.shape}")
    d = b - a
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(np.mean(d)), se
