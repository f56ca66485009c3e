"""RoIAlign with aligned=True and adaptive sampling (ceil(side / out) samples per bin side), one box per image.

Every function here has the signature the encoders take: (feature [B, C, H, W], boxes [B, 4] xyxy in input
pixels, out bins per side, scale = 1 / stride) -> [B, C, out, out], box b pooled from image b.
"""
import math

import torch


def _axis_weights(start, length, out, grid, size, dtype):
    """[out, size] RoIAlign weights along one axis: bin p averages `grid` bilinear samples at
    start + (p + (i + 0.5) / grid) * length / out, each spread over its two neighbouring cells
    (torchvision's bilinear_interpolate: zero beyond one cell outside, clamped at the border)."""
    weights = torch.zeros(out, size, dtype=dtype)
    for p in range(out):
        for i in range(grid):
            y = start + (p + (i + 0.5) / grid) * length / out
            if y < -1.0 or y > size:
                continue
            y = max(y, 0.0)
            low = int(math.floor(y))
            if low >= size - 1:
                weights[p, size - 1] += 1.0 / grid
                continue
            weights[p, low] += (low + 1 - y) / grid
            weights[p, low + 1] += (y - low) / grid
    return weights


def roi_align(feature, boxes, out, scale):
    """From the definition, a python loop over boxes (the reference; slow on any device). Bilinear sampling
    factorises into rows times columns, so each box is two weight matrices."""
    rows = []
    for b in range(feature.shape[0]):
        x1, y1, x2, y2 = [float(v) * scale - 0.5 for v in boxes[b]]
        h, w = y2 - y1, x2 - x1
        wy = _axis_weights(y1, h, out, max(1, math.ceil(h / out)), feature.shape[2], feature.dtype)
        wx = _axis_weights(x1, w, out, max(1, math.ceil(w / out)), feature.shape[3], feature.dtype)
        rows.append(torch.einsum("ph,chw,qw->cpq", wy.to(feature.device), feature[b], wx.to(feature.device)))
    return torch.stack(rows)


def torchvision_roi_align(feature, boxes, out, scale):
    """torchvision's kernel (any device, autocast-aware), the same semantics."""
    from torchvision.ops import roi_align as kernel

    index = torch.arange(feature.shape[0], device=boxes.device, dtype=boxes.dtype)[:, None]
    return kernel(feature, torch.cat([index, boxes], dim=1), (out, out), spatial_scale=scale, sampling_ratio=0,
                  aligned=True)
