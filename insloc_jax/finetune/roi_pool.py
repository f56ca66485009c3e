"""RoIAlign as two dense matmuls per image: torchvision's numbers, a multi-threaded backward on CPU.

torchvision's CPU `roi_align` backward is a single-threaded scatter loop over RoIs, bins and samples; on a
2-core machine it took 24 % of an FPN fine-tuning iteration and 34 % of a C4 one (0.8 s per call for 512
RoIs of 14x14 on a 128-channel 8x8 map). RoIAlign is separable, so this module computes it without that
kernel. For RoI r on image b(r), bin (i, j) and channel c,

    out[r, c, i, j] = sum_{y, x} Ay[r, i, y] * Ax[r, j, x] * F[b(r), c, y, x]

where Ay[r, i, y] is the mean, over bin i's sampling rows, of the bilinear weight a sampling row gives
feature row y (Ax likewise for columns). torchvision's boundary rules factor by axis: a sample is dropped
when y < -1 or y > H or x < -1 or x > W, which is the product of a row test and a column test; a
coordinate <= 0 reads index 0; one whose floor is >= size - 1 reads the last index only. The adaptive
sample count (sampling_ratio <= 0) is ceil(roi_size / pooled_size) per RoI and axis, so the bin mean
divides by the two counts separately. Forward and backward are then matmuls that autograd differentiates;
no [R, C, H, W] gather is built.

`MultiScaleRoIAlign` is torchvision's pooler (same constructor, scales, level mapper and output order,
no parameters) with this `roi_align` in place of torchvision's operator.
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torchvision
from torch import Tensor
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(height, width) from an int or a pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _sample_positions(start: Tensor, extent: Tensor, pooled: int, sampling_ratio: int) -> Tuple[Tensor, Tensor]:
    """Sampling coordinates along one axis, [R, pooled, S], and their per-RoI count, [R].

    S is sampling_ratio, or (adaptive, sampling_ratio <= 0) the largest ceil(extent / pooled) of the batch;
    a RoI's positions past its own count are returned but must be masked by the caller. The arithmetic
    follows torchvision's kernel term by term so that float32 results agree to rounding.
    """
    bin_size = extent / pooled
    if sampling_ratio > 0:
        grid = torch.full_like(extent, float(sampling_ratio))
    else:
        grid = torch.ceil(extent / pooled)
    samples = sampling_ratio if sampling_ratio > 0 else max(int(grid.max().item()) if len(grid) else 0, 1)
    bins = torch.arange(pooled, dtype=extent.dtype, device=extent.device)
    offsets = torch.arange(samples, dtype=extent.dtype, device=extent.device) + 0.5
    per_bin, per_sample = bin_size[:, None, None], grid[:, None, None]
    positions = start[:, None, None] + bins[None, :, None] * per_bin + offsets[None, None, :] * per_bin / per_sample
    return positions, grid


def _axis_weights(start: Tensor, extent: Tensor, pooled: int, sampling_ratio: int, size: int) -> Tensor:
    """A [R, pooled, size]: bin p's mean bilinear weight on feature index 0..size-1 along one axis.

    start, extent: [R], the RoI's first coordinate and length in feature pixels along this axis.
    """
    positions, grid = _sample_positions(start, extent, pooled, sampling_ratio)
    sample_index = torch.arange(positions.shape[-1], device=positions.device)
    kept = (positions >= -1.0) & (positions <= size) & (sample_index[None, None, :] < grid[:, None, None])
    # Dropped samples (also the NaN positions of an adaptive count of 0) read index 0 with weight 0.
    position = torch.where(kept, positions, torch.zeros_like(positions)).clamp(min=0.0)
    low = position.long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    position = torch.where(at_edge, low.to(position.dtype), position)
    frac = (position - low.to(position.dtype)) * kept
    weights = torch.zeros(positions.shape[:2] + (size,), dtype=positions.dtype, device=positions.device)
    weights.scatter_add_(2, low, kept.to(position.dtype) - frac)
    weights.scatter_add_(2, high, frac)
    return weights / grid.clamp(min=1.0)[:, None, None]


def _separable_weights(rois: Tensor, output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int,
                       aligned: bool, height: int, width: int) -> Tuple[Tensor, Tensor]:
    """(Ay [R, ph, H], Ax [R, pw, W]) for rois [R, 5] (batch index, x1, y1, x2, y2) in image coordinates."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, k] * spatial_scale - offset for k in range(1, 5))
    roi_width, roi_height = x2 - x1, y2 - y1
    if not aligned:
        roi_width, roi_height = roi_width.clamp(min=1.0), roi_height.clamp(min=1.0)
    rows = _axis_weights(y1, roi_height, output_size[0], sampling_ratio, height)
    cols = _axis_weights(x1, roi_width, output_size[1], sampling_ratio, width)
    return rows, cols


def _contract_rows(features: Tensor, rows: Tensor, batch: Tensor) -> Tensor:
    """[R, ph, C, W]: sum_y rows[r, i, y] * features[batch[r], :, y, :], RoIs in their given order.

    Per image it is one [R_b*ph, H] x [H, C*W] matmul on that image's feature, so no per-RoI copy of the
    feature map is made; the image loop is over rois sorted by image.
    """
    num_images, channels, height, width = features.shape
    order = torch.argsort(batch, stable=True)
    counts = torch.bincount(batch, minlength=num_images).tolist()
    by_image = features.permute(0, 2, 1, 3).reshape(num_images, height, channels * width).unbind(0)
    pieces = [rows[index].flatten(0, 1) @ feature for feature, index in zip(by_image, torch.split(order, counts))]
    by_row = torch.cat(pieces).reshape(len(batch), rows.shape[1], channels, width)
    return _in_order(by_row, order)


def _contract_cols(by_row: Tensor, cols: Tensor) -> Tensor:
    """[R, C, ph, pw], contiguous: sum_x by_row[r, i, c, x] * cols[r, j, x], a batched matmul per RoI.

    The product comes out as [R, ph, C, pw]; one transposing copy is needed, and it is made of whichever is
    smaller, the [R, ph, C, W] input (W <= pw, as for res4 / P5) or the output (W > pw, as for P2).
    """
    count, ph, channels, width = by_row.shape
    pw = cols.shape[1]
    if width <= pw:
        by_channel = by_row.transpose(1, 2).reshape(count, channels * ph, width)
        return torch.bmm(by_channel, cols.transpose(1, 2)).view(count, channels, ph, pw)
    pooled = torch.bmm(by_row.reshape(count, ph * channels, width), cols.transpose(1, 2))
    return pooled.view(count, ph, channels, pw).transpose(1, 2).contiguous()


def _in_order(values: Tensor, order: Tensor) -> Tensor:
    """values [R, ...] whose row k belongs to RoI order[k], rearranged so that row r is RoI r (no copy when
    order is already the identity, as for one image's RoIs or RoIs grouped by image)."""
    if bool((order == torch.arange(len(order), device=order.device)).all()):
        return values
    return values.index_select(0, torch.argsort(order))


def roi_align(features: Tensor, rois: Tensor, output_size: Union[int, Sequence[int]], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """torchvision.ops.roi_align's output, differentiable w.r.t. features through dense matmuls.

    features: [N, C, H, W]. rois: [R, 5] rows (batch index, x1, y1, x2, y2) in image coordinates, which
    `spatial_scale` maps to feature pixels; boxes may extend past the map. output_size: ph or (ph, pw).
    sampling_ratio: samples per bin side, or <= 0 for ceil(roi_size / pooled_size) per RoI. aligned: shift
    boxes by -0.5 pixel (and skip the legacy minimum size of 1). Returns [R, C, ph, pw] in rois' order.
    No gradient flows to rois, as with torchvision.
    """
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be [R, 5] (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}")
    (ph, pw), (num_images, channels, height, width) = _pair(output_size), features.shape
    if num_images == 0:
        return features.new_zeros((0, channels, ph, pw))
    with torch.no_grad():
        rois = rois.to(features.dtype)
        rows, cols = _separable_weights(rois, (ph, pw), spatial_scale, sampling_ratio, aligned, height, width)
    return _contract_cols(_contract_rows(features, rows, rois[:, 0].long()), cols)


def _pool_levels(levels: List[Tensor], boxes: List[Tensor], output_size: Tuple[int, int], sampling_ratio: int,
                 scales: List[float], mapper) -> Tensor:
    """[R, C, ph, pw] for all images' boxes in order, each RoI pooled from the level the mapper gives it."""
    rois = _convert_to_roi_format(boxes)
    if len(levels) == 1:
        return roi_align(levels[0], rois, output_size, scales[0], sampling_ratio)
    assigned = mapper(boxes)
    where = [torch.where(assigned == level)[0] for level in range(len(levels))]
    pieces = [roi_align(feature, rois[index], output_size, scale, sampling_ratio)
              for feature, scale, index in zip(levels, scales, where)]
    return _in_order(torch.cat(pieces), torch.cat(where))


class MultiScaleRoIAlign(torchvision.ops.MultiScaleRoIAlign):
    """torchvision.ops.MultiScaleRoIAlign (same arguments, level assignment, output order and empty
    state_dict) pooling with this module's `roi_align`, whose CPU backward is matmuls, not a scatter loop."""

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        """x: name -> [N, C, H_l, W_l]; boxes: per image [R_i, 4] (x1, y1, x2, y2) in image coordinates;
        image_shapes: per image (height, width) before the backbone. Returns [sum R_i, C, ph, pw]."""
        levels = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(levels, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        return _pool_levels(levels, boxes, self.output_size, self.sampling_ratio, self.scales, self.map_levels)
