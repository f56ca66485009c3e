"""The separable RoIAlign and its pooler against torchvision's own operator and MultiScaleRoIAlign.

torchvision is the independent reference: forward values and feature gradients must agree for every
sampling mode, with and without `aligned`, for boxes inside, on the border, partly or wholly outside the
map, under one feature pixel, on several images (in shuffled order, one image without RoIs) and for no RoIs.
"""
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from insloc_jax.finetune.roi_pool import MultiScaleRoIAlign, roi_align  # noqa: E402

N, C, H, W = 4, 5, 12, 10
SCALE = 0.25  # boxes live on a 48 x 40 image
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # of the reference's largest magnitude


def _boxes(generator, count=40):
    """Random boxes over and around the image, then the edge cases, as float64 [count + 13, 4]."""
    xy = torch.rand(count, 2, generator=generator, dtype=torch.float64) * torch.tensor([56.0, 64.0]) - 8.0
    wh = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 40.0 + 0.1
    special = torch.tensor([
        [10.0, 12.0, 10.6, 12.3],    # under one image pixel, far under one feature pixel
        [25.0, 30.0, 25.2, 30.9],    # under one feature pixel
        [0.0, 0.0, 40.0, 48.0],      # exactly the image
        [0.0, 0.0, 6.0, 48.0],       # along the left border
        [34.0, 40.0, 40.0, 48.0],    # in the bottom-right corner
        [30.0, 20.0, 60.0, 55.0],    # partly outside (bottom right)
        [-20.0, -30.0, 70.0, 80.0],  # larger than the map on both sides
        [-15.0, -9.0, -6.0, -4.5],   # wholly outside, negative coordinates
        [50.0, 60.0, 58.0, 70.0],    # wholly outside beyond the far edges
        [-3.0, 5.0, 12.0, 47.0],     # negative start, reaches the bottom edge
        [20.0, 16.0, 20.0, 30.0],    # zero width (aligned + adaptive: no column samples)
        [20.0, 20.0, 12.0, 15.0],    # inverted (negative size)
        [20.0, 36.0, 30.0, 60.0],    # rows 9..15: with 3 bins of 1 sample, one sample row is exactly y = H
    ], dtype=torch.float64)
    return torch.cat([torch.cat([xy, xy + wh], 1), special])


def _rois(generator, dtype):
    """[R, 5] rois on images 0, 1 and 3 (image 2 has none), in shuffled image order."""
    boxes = _boxes(generator)
    batch = torch.tensor([0, 1, 3], dtype=torch.float64)[torch.randint(0, 3, (len(boxes),), generator=generator)]
    return torch.cat([batch[:, None], boxes], 1).to(dtype)


def _assert_close(actual, expected, dtype):
    assert actual.shape == expected.shape
    error, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} on values up to {scale:.3g}"


def _value_and_grad(op, features, upstream):
    """op(features) and d<op(features), upstream>/d features."""
    leaf = features.detach().requires_grad_(True)
    out = op(leaf)
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    return out.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
@pytest.mark.parametrize("output_size", [(3, 4), (7, 14)])  # narrower and wider than the map (W = 10)
def test_roi_align_matches_torchvision(dtype, aligned, sampling_ratio, output_size):
    generator = torch.Generator().manual_seed(sampling_ratio + 3 * aligned)
    features = torch.randn(N, C, H, W, generator=generator, dtype=dtype)
    rois = _rois(generator, dtype)
    upstream = torch.randn((len(rois), C) + output_size, generator=generator, dtype=dtype)
    args = (output_size, SCALE, sampling_ratio, aligned)
    expected, expected_grad = _value_and_grad(lambda f: torchvision.ops.roi_align(f, rois, *args), features, upstream)
    actual, actual_grad = _value_and_grad(lambda f: roi_align(f, rois, *args), features, upstream)
    _assert_close(actual, expected, dtype)
    _assert_close(actual_grad, expected_grad, dtype)
    assert expected_grad[2].abs().max() == 0 and expected.abs().max() > 0  # the cases exercise what they claim


def test_roi_align_without_rois():
    features = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = roi_align(features, torch.zeros(0, 5), 7, 0.5, 2)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert features.grad is not None and features.grad.abs().max() == 0


def _pyramid(generator, sizes):
    """name -> [2, C, s, s] for each size s, the level names "0", "1", ..."""
    return OrderedDict((str(k), torch.randn(2, C, s, s, generator=generator)) for k, s in enumerate(sizes))


def _image_boxes(generator, count, height, width):
    """[count + 1, 4] boxes with 0 <= x1 < x2 <= width, 0 <= y1 < y2 <= height, from half a pixel up, then
    the whole image (the only size that reaches P5 with canonical_scale 56)."""
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width - 1.0, height - 1.0])
    extent = torch.rand(count, 2, generator=generator) ** 2 * torch.tensor([float(width), float(height)]) + 0.5
    far = torch.minimum(corner + extent, torch.tensor([float(width), float(height)]))
    whole = torch.tensor([[0.0, 0.0, float(width), float(height)]])
    return torch.cat([torch.cat([corner, far], 1), whole])


@pytest.mark.parametrize("output_size", [7, 14])
@pytest.mark.parametrize("sizes", [(32, 16, 8, 4), (8,)], ids=["fpn", "single"])
def test_pooler_matches_torchvision(output_size, sizes):
    generator = torch.Generator().manual_seed(output_size + len(sizes))
    pyramid = _pyramid(generator, sizes)
    image_shapes = [(128, 120), (112, 128)]  # the padded batch is 128 x 128: level k has scale sizes[k] / 128
    boxes = [_image_boxes(generator, 50, h, w) for h, w in image_shapes]
    names = list(pyramid)
    reference = torchvision.ops.MultiScaleRoIAlign(names, output_size, 2, canonical_scale=56)
    pooler = MultiScaleRoIAlign(names, output_size, 2, canonical_scale=56)
    assert pooler.state_dict() == {} and list(pooler.parameters()) == []
    upstream = torch.randn(102, C, output_size, output_size, generator=generator)
    leaves = OrderedDict((k, v.requires_grad_(True)) for k, v in pyramid.items())
    expected = reference(leaves, boxes, image_shapes)
    expected_grads = torch.autograd.grad(expected, list(leaves.values()), upstream)
    actual = pooler(leaves, boxes, image_shapes)
    actual_grads = torch.autograd.grad(actual, list(leaves.values()), upstream)
    assert pooler.scales == reference.scales
    _assert_close(actual.detach(), expected.detach(), torch.float32)
    for got, want in zip(actual_grads, expected_grads):
        _assert_close(got, want, torch.float32)
    if len(sizes) > 1:
        assert len(torch.unique(reference.map_levels(boxes))) == 4  # the boxes reach every level
