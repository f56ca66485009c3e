"""Plain-loop numpy RoIAlign written from the torchvision / mmcv definition, for tests.

The op is linear in the features, so the reference builds its matrix: out = M @ features.reshape(-1) and
grad_features = M.T @ grad_out. Every number is computed in float32 scalars in the definition's order.
"""
import math

import numpy as np


def _bilinear_taps(y, x, height, width):
    """Taps [(h, w, weight)] of one sample, torchvision's `bilinear_interpolate` rules."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    y = max(y, np.float32(0.0))
    x = max(x, np.float32(0.0))
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = np.float32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = np.float32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = np.float32(y - y_low), np.float32(x - x_low)
    hy, hx = np.float32(1.0) - ly, np.float32(1.0) - lx
    return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


def roi_align_matrix(feature_shape, boxes, batch_indices, output_size, spatial_scale, sampling_ratio, aligned):
    """Returns M [R*out_h*out_w, N*H*W] with out[r, p, q, :] = M[(r, p, q)] @ features.reshape(N*H*W, C)."""
    n, height, width = feature_shape
    out_h, out_w = output_size
    boxes = np.asarray(boxes, np.float32)
    matrix = np.zeros((len(boxes) * out_h * out_w, n * height * width), np.float64)
    f32 = np.float32
    scale, offset = f32(spatial_scale), f32(0.5 if aligned else 0.0)
    for r, (x1, y1, x2, y2) in enumerate(boxes):
        b = int(batch_indices[r])
        start_w, start_h = x1 * scale - offset, y1 * scale - offset
        roi_w, roi_h = x2 * scale - offset - start_w, y2 * scale - offset - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, f32(1.0)), max(roi_h, f32(1.0))
        bin_h, bin_w = f32(roi_h / f32(out_h)), f32(roi_w / f32(out_w))
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / f32(out_h))
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / f32(out_w))
        count = max(grid_h * grid_w, 1)
        for p in range(out_h):
            for q in range(out_w):
                row = (r * out_h + p) * out_w + q
                for iy in range(grid_h):
                    y = f32(start_h + f32(p) * bin_h + f32(iy + 0.5) * bin_h / f32(grid_h))
                    for ix in range(grid_w):
                        x = f32(start_w + f32(q) * bin_w + f32(ix + 0.5) * bin_w / f32(grid_w))
                        for h, w, weight in _bilinear_taps(y, x, height, width):
                            matrix[row, (b * height + h) * width + w] += weight / count
    return matrix


def roi_align_numpy(features, boxes, batch_indices, output_size, spatial_scale, sampling_ratio, aligned):
    """Reference forward. features [N, H, W, C] -> [R, out_h, out_w, C] (float64)."""
    n, height, width, channels = features.shape
    matrix = roi_align_matrix((n, height, width), boxes, batch_indices, output_size, spatial_scale,
                              sampling_ratio, aligned)
    out = matrix @ features.reshape(n * height * width, channels).astype(np.float64)
    return out.reshape(len(boxes), output_size[0], output_size[1], channels)
