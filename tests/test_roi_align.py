"""RoIAlign against the plain-loop numpy reference written from the torchvision definition."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from insloc_jax.ops.roi_align import default_max_grid, roi_align
from roi_align_reference import roi_align_matrix, roi_align_numpy

N, H, W, C = 3, 12, 10, 5
SCALE = 0.25  # input canvas 48 x 40 for a 12 x 10 map


def _boxes(seed, count=14):
    """Random boxes plus the edge cases: sub-pixel, larger than the map, partly / wholly outside, negative."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-8.0, 44.0, size=(count, 2))
    wh = rng.uniform(0.2, 40.0, size=(count, 2))
    random_boxes = np.concatenate([xy, xy + wh], axis=1)
    special = np.array([
        [10.0, 12.0, 10.6, 12.3],    # under one input pixel (and far under one feature pixel)
        [-20.0, -30.0, 70.0, 80.0],  # larger than the map on both axes
        [30.0, 20.0, 60.0, 55.0],    # partly outside (bottom right)
        [-15.0, -9.0, -6.0, -4.5],   # wholly outside, negative coordinates
        [50.0, 60.0, 58.0, 70.0],    # wholly outside beyond the far edges
        [-3.0, 5.0, 12.0, 47.0],     # negative start, touches the bottom edge
        [0.0, 0.0, 40.0, 48.0],      # exactly the whole canvas
        [20.0, 20.0, 12.0, 15.0],    # inverted (negative size)
        [-10.0, -14.0, 74.0, 70.0],  # 21 feature pixels: 21 / 7 must give exactly 3 samples, not 4
    ])
    return np.concatenate([random_boxes, special]).astype(np.float32)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((N, H, W, C)).astype(np.float32)
    boxes = _boxes(seed)
    batch = rng.integers(0, N, size=len(boxes)).astype(np.int32)
    return features, boxes, batch


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
@pytest.mark.parametrize("output_size", [(7, 7), (14, 14), (3, 5)])
def test_forward_matches_reference(aligned, sampling_ratio, output_size):
    features, boxes, batch = _inputs(seed=sampling_ratio * 10 + output_size[1])
    # Boxes here reach 110 input pixels (27.5 feature pixels) across; a bound of 12 keeps them all exact.
    got = roi_align(jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(batch), output_size, SCALE,
                    sampling_ratio, aligned, max_grid=12)
    want = roi_align_numpy(features, boxes, batch, output_size, SCALE, sampling_ratio, aligned)
    assert got.shape == (len(boxes),) + output_size + (C,)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("aligned", [True, False])
def test_one_box_per_image_path_matches_reference(aligned):
    features, boxes, _ = _inputs(seed=3)
    boxes = boxes[[0, 15, 17]]  # a random box, one larger than the map, one partly outside
    batch = np.arange(N, dtype=np.int32)
    got = roi_align(jnp.asarray(features), jnp.asarray(boxes), None, (7, 7), SCALE, 0, aligned, max_grid=12)
    want = roi_align_numpy(features, boxes, batch, (7, 7), SCALE, 0, aligned)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_default_bound_is_exact_inside_the_map_and_documented_outside():
    features, _, _ = _inputs(seed=5)
    inside = np.array([[0.0, 0.0, 40.0, 48.0], [1.0, 2.0, 39.0, 30.0], [5.5, 7.25, 6.0, 8.0]], np.float32)
    batch = np.array([0, 1, 2], np.int32)
    bound = default_max_grid((H, W), (3, 3))
    assert bound == 4
    got = roi_align(features, inside, batch, (3, 3), SCALE, 0, True)
    np.testing.assert_allclose(np.asarray(got), roi_align_numpy(features, inside, batch, (3, 3), SCALE, 0, True),
                               atol=1e-5)
    # A box needing more than max_grid samples per side is averaged over max_grid samples on that axis.
    huge = np.array([[-40.0, -40.0, 100.0, 100.0]], np.float32)
    got = roi_align(features, huge, batch[:1], (3, 3), SCALE, 0, True)
    want = roi_align_numpy(features, huge, batch[:1], (3, 3), SCALE, bound, True)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("one_per_image", [False, True])
def test_gradient_matches_reference_backward(sampling_ratio, one_per_image):
    features, boxes, batch = _inputs(seed=11)
    if one_per_image:
        boxes, batch = boxes[[1, 15, 18]], np.arange(N, dtype=np.int32)
    rng = np.random.default_rng(0)
    cotangent = rng.standard_normal((len(boxes), 7, 7, C)).astype(np.float32)

    def loss(f):
        out = roi_align(f, jnp.asarray(boxes), None if one_per_image else jnp.asarray(batch), (7, 7), SCALE,
                        sampling_ratio, True, max_grid=12)
        return jnp.sum(out * cotangent)

    grad = jax.grad(loss)(jnp.asarray(features))
    matrix = roi_align_matrix((N, H, W), boxes, batch, (7, 7), SCALE, sampling_ratio, True)
    want = (matrix.T @ cotangent.reshape(-1, C)).reshape(N, H, W, C)
    np.testing.assert_allclose(np.asarray(grad), want, atol=1e-5, rtol=0)


def test_no_gradient_through_boxes():
    features, boxes, batch = _inputs(seed=2)
    grad = jax.grad(lambda b: jnp.sum(roi_align(features, b, batch, (7, 7), SCALE)))(jnp.asarray(boxes))
    assert np.all(np.asarray(grad) == 0.0)


def test_bfloat16_keeps_dtype_and_accuracy():
    features, boxes, batch = _inputs(seed=4)
    got = roi_align(jnp.asarray(features, jnp.bfloat16), boxes, batch, (7, 7), SCALE, 0, True, max_grid=12)
    assert got.dtype == jnp.bfloat16
    want = roi_align_numpy(np.asarray(jnp.asarray(features, jnp.bfloat16), np.float32), boxes, batch, (7, 7),
                           SCALE, 0, True)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=1e-2)


def test_jit_and_pmap_on_eight_devices_match_reference():
    devices = jax.local_device_count()
    assert devices == 8, "tests run with 8 fake CPU devices (see tests/conftest.py)"
    rng = np.random.default_rng(7)
    features = rng.standard_normal((devices, 2, H, W, C)).astype(np.float32)
    boxes = np.stack([_boxes(seed=d, count=4)[:6] for d in range(devices)])  # [8, 6, 4]
    batch = rng.integers(0, 2, size=(devices, 6)).astype(np.int32)
    fn = functools.partial(roi_align, output_size=(7, 7), spatial_scale=SCALE, sampling_ratio=0, aligned=True,
                           max_grid=12)
    jitted = jax.jit(fn)(features[0], boxes[0], batch[0])
    pmapped = jax.pmap(fn)(features, boxes, batch)
    for d in range(devices):
        want = roi_align_numpy(features[d], boxes[d], batch[d], (7, 7), SCALE, 0, True)
        np.testing.assert_allclose(np.asarray(pmapped[d]), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(pmapped[0]), atol=1e-6, rtol=0)


def test_mismatched_box_count_without_batch_indices_is_a_clear_error():
    features, boxes, _ = _inputs(seed=1)
    with pytest.raises(ValueError, match="one box per image"):
        roi_align(features, boxes, None, (7, 7), SCALE)
