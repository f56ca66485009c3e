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


def make_extractors(encoder: Encoder, grids=REGRESSION_GRIDS):
    """The probes' jitted feature functions of a frozen encoder (BatchNorm in evaluation mode).

    Args:
      encoder: the run's Encoder; `Encoder.features` (res2..res5) and, for grids on FPN levels (p2..p5),
        `Encoder.pyramid`.
      grids: the box probe's ((map name, grid side), ...): each jittered box's context window is pooled to
        a side x side grid on every named map and the grids are concatenated. The default reads res4 at 4 x 4
        and res5 at 2 x 2.

    Returns:
      (composite_features, whole_features):
        composite_features(variables, images [B, S, S, 3], boxes [B, 4], jittered [B, J, 4]) ->
          {"box": [B, C5] true-box feature, "regress": [B, J, D] jittered-box grid features, D = the sum of
          side^2 x channels over `grids` (16 * C4 + 4 * C5 by default)};
        whole_features(variables, images [B, s, s, 3]) -> [B, C5] global-pooled res5.
    """
    names = {"res5"} | {name for name, _ in grids}
    reads_pyramid = any(name.startswith("p") for name in names)
    if reads_pyramid and encoder.arch != "fpn":
        raise ValueError(f"box probe grids {grids} read FPN levels, which a {encoder.arch!r} encoder has not")

    def maps(variables, images):
        feats = dict(encoder.apply(variables, images, train=False, method=Encoder.features))
        if reads_pyramid:
            feats.update(encoder.apply(variables, images, train=False, method=Encoder.pyramid))
        return {k: feats[k].astype(jnp.float32) for k in names}

    def composite_features(variables, images, boxes, jittered):
        feats = maps(variables, images)
        scale = {k: v.shape[1] / images.shape[1] for k, v in feats.items()}  # 1 / stride
        box = roi_align(feats["res5"], boxes, None, 7, scale["res5"]).mean(axis=(1, 2))  # [B, C5]
        b, j = jittered.shape[:2]
        window = context_boxes(jittered.reshape(b * j, 4), images.shape[1])  # row r belongs to image r // J
        owner = jnp.repeat(jnp.arange(b), j)
        pooled = [roi_align(feats[k], window, owner, size, scale[k]).reshape(b, j, -1) for k, size in grids]
        return {"box": box, "regress": jnp.concatenate(pooled, axis=2)}

    def whole_features(variables, images):
        res5 = encoder.apply(variables, images, train=False, method=Encoder.features)["res5"]
        return res5.astype(jnp.float32).mean(axis=(1, 2))  # [B, C5]

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
