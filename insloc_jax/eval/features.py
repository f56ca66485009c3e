"""The probes' features of a frozen encoder, computed in JAX: box features, jittered-box grids, pooled res5."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from insloc_jax.models.encoder import Encoder
from insloc_jax.ops.roi_align import roi_align

CONTEXT = 1.5
REGRESSION_GRIDS = (("res4", 4), ("res5", 2))


def context_boxes(boxes: jnp.ndarray, canvas_size: int, factor: float = CONTEXT) -> jnp.ndarray:
    """[B, 4] boxes enlarged `factor` times about their centres and clipped to the canvas."""
    centre = 0.5 * (boxes[:, :2] + boxes[:, 2:])
    half = 0.5 * factor * (boxes[:, 2:] - boxes[:, :2])
    return jnp.clip(jnp.concatenate([centre - half, centre + half], axis=1), 0.0, float(canvas_size))


def make_extractors(encoder: Encoder):
    """The probes' jitted feature functions of a frozen encoder (BatchNorm in evaluation mode).

    Args:
      encoder: the run's Encoder; only `Encoder.features` (res4, res5) is used.

    Returns:
      (composite_features, whole_features):
        composite_features(variables, images [B, S, S, 3], boxes [B, 4], jittered [B, J, 4]) ->
          {"box": [B, C5] true-box feature, "regress": [B, J, 16 * C4 + 4 * C5] jittered-box grid features};
        whole_features(variables, images [B, s, s, 3]) -> [B, C5] global-pooled res5.
    """

    def maps(variables, images):
        feats = encoder.apply(variables, images, train=False, method=Encoder.features)
        return {k: feats[k].astype(jnp.float32) for k in ("res4", "res5")}

    def composite_features(variables, images, boxes, jittered):
        feats = maps(variables, images)
        scale = {k: v.shape[1] / images.shape[1] for k, v in feats.items()}  # 1 / stride
        box = roi_align(feats["res5"], boxes, None, 7, scale["res5"]).mean(axis=(1, 2))  # [B, C5]
        b, j = jittered.shape[:2]
        window = context_boxes(jittered.reshape(b * j, 4), images.shape[1])  # row r belongs to image r // J
        owner = jnp.repeat(jnp.arange(b), j)
        grids = [roi_align(feats[k], window, owner, size, scale[k]).reshape(b, j, -1)
                 for k, size in REGRESSION_GRIDS]
        return {"box": box, "regress": jnp.concatenate(grids, axis=2)}

    def whole_features(variables, images):
        return maps(variables, images)["res5"].mean(axis=(1, 2))  # [B, C5]

    return jax.jit(composite_features), jax.jit(whole_features)


def batched(fn, variables, arrays, batch_size: int):
    """Runs fn over chunks of the leading axis and concatenates the (host) outputs.

    Args:
      fn: jitted fn(variables, *chunks) -> array or dict of arrays, per-row outputs.
      variables: passed through.
      arrays: equally long arrays [N, ...].
      batch_size: rows per call; every call gets the same shape (the last chunk is padded by repeating the
        last row), so fn compiles once.

    Returns:
      fn's output structure with numpy arrays of N rows.
    """
    n = len(arrays[0])
    size = min(batch_size, n)
    pad = -n % size
    padded = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a for a in arrays]
    outs = [jax.device_get(fn(variables, *[a[s:s + size] for a in padded])) for s in range(0, n + pad, size)]
    return jax.tree.map(lambda *parts: np.concatenate(parts)[:n], *outs)
