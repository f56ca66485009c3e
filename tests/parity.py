"""Helpers shared by the Flax-vs-PyTorch parity tests."""

import jax
import numpy as np
import torch


def randomize_batchnorm(variables, seed=0):
    """Non-trivial BatchNorm state: scale U(0.5, 1.5), bias N(0, 0.1), mean N(0, 0.1), var U(0.5, 2).

    Args:
      variables: flax {"params", "batch_stats"} with BatchNorm leaves named scale / bias / mean / var.

    Returns:
      A copy (numpy leaves) in which every BatchNorm leaf is redrawn; other leaves are kept.
    """
    rng = np.random.default_rng(seed)

    def redraw(path, leaf):
        leaf = np.asarray(leaf)
        names = [getattr(p, "key", "") for p in path]
        is_bn = names[-1] in ("mean", "var") or "scale" in _siblings(variables, path)
        if not is_bn:
            return leaf
        draw = {"scale": lambda s: rng.uniform(0.5, 1.5, s), "bias": lambda s: rng.normal(0.0, 0.1, s),
                "mean": lambda s: rng.normal(0.0, 0.1, s), "var": lambda s: rng.uniform(0.5, 2.0, s)}
        return draw[names[-1]](leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(redraw, variables)


def _siblings(tree, path):
    for p in path[:-1]:
        tree = tree[p.key]
    return tree.keys()


def rel_err(ours, ref):
    """max |ours - ref| / max |ref| (ours NHWC or any, ref converted to the same layout by the caller)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def to_nchw(x):
    """numpy NHWC -> torch NCHW float32."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def from_nchw(t):
    """torch NCHW -> numpy NHWC."""
    return t.detach().numpy().transpose(0, 2, 3, 1)


def load_strict(model, state_dict):
    """Loads numpy arrays into a torch module with strict=True (every key present, none extra)."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    return model.eval()


def random_batches(count, global_batch, size, dtype=np.float32, seed=0):
    """`count` step batches of random normalised images [N, size, size, 3] and valid boxes [N, 4] per view,
    sized for a 64-px canvas (sides 24..40, inside the image)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        xy = rng.uniform(0, 24, (2, global_batch, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(24, 40, (2, global_batch, 2))], -1).astype(np.float32)
        images = rng.standard_normal((2, global_batch, size, size, 3)).astype(dtype)
        out.append({"image1": images[0], "image2": images[1], "boxes1": boxes[0], "boxes2": boxes[1]})
    return out
