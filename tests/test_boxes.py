"""Box ops against plain numpy references written from their definitions."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from insloc_jax.ops import boxes as box_ops

CANVAS = (256, 256)


def _iou_ref(a, b):
    """IoU of two boxes, mmdetection convention (no +1, union floored at 1e-6)."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)
    return inter / max(area(a) + area(b) - inter, 1e-6)


def _nms_ref(boxes, scores, threshold, valid):
    """Textbook greedy NMS: visit boxes by descending score, keep one unless a kept box overlaps it."""
    order = sorted(np.flatnonzero(valid), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(_iou_ref(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    mask = np.zeros(len(boxes), bool)
    mask[kept] = True
    return mask


def _random_boxes(rng, count, low=0.0, high=256.0):
    xy = rng.uniform(low, high, size=(count, 2))
    wh = rng.uniform(0.0, 120.0, size=(count, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_pairwise_iou_matches_loops():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 9), _random_boxes(rng, 13)
    b[0] = a[0]  # identical pair -> 1
    b[1] = [300, 300, 310, 320]  # disjoint -> 0
    b[2] = [5, 5, 5, 9]  # zero area
    got = np.asarray(box_ops.pairwise_iou(a, b))
    want = np.array([[_iou_ref(x, y) for y in b] for x in a])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[0, 0] == pytest.approx(1.0)


def test_anchor_grid_matches_reference_definition():
    anchors = box_ops.anchor_grid(CANVAS)
    scales, ratios = (2, 4, 8, 16), (0.5, 0.75, 1.0, 1.5, 2.0)
    assert anchors.shape == (16 * 16 * 20, 4)
    want = []
    for y in range(16):
        for x in range(16):
            for r in ratios:
                for s in scales:
                    w, h = 16 * s / math.sqrt(r), 16 * s * math.sqrt(r)
                    cx, cy = 16 * x, 16 * y
                    want.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    np.testing.assert_allclose(anchors, np.array(want), rtol=1e-6, atol=1e-4)


def test_nms_matches_greedy_reference():
    rng = np.random.default_rng(1)
    for trial in range(5):
        boxes = _random_boxes(rng, 60, high=120.0)
        scores = rng.uniform(size=60).astype(np.float32)
        valid = rng.uniform(size=60) < 0.8
        for threshold in (0.3, 0.5, 0.7):
            got = np.asarray(jax.jit(box_ops.nms, static_argnums=2)(boxes, scores, threshold, valid))
            np.testing.assert_array_equal(got, _nms_ref(boxes, scores, threshold, valid))


def test_nms_on_all_anchors_matches_reference():
    anchors = box_ops.anchor_grid((64, 64))  # 4 x 4 positions x 20 shapes
    rng = np.random.default_rng(2)
    scores = rng.uniform(size=len(anchors)).astype(np.float32)
    valid = np.ones(len(anchors), bool)
    got = np.asarray(box_ops.nms(anchors, scores, 0.7, valid))
    np.testing.assert_array_equal(got, _nms_ref(anchors, scores, 0.7, valid))


def test_candidate_mask_threshold_and_fallback():
    ious = jnp.array([0.1, 0.6, 0.5, 0.9, 0.0])
    np.testing.assert_array_equal(box_ops.candidate_mask(ious, 0.5, 2), [False, True, False, True, False])
    low = jnp.array([0.1, 0.3, 0.05, 0.2, 0.0])
    np.testing.assert_array_equal(box_ops.candidate_mask(low, 0.5, 2), [False, True, False, True, False])


def _sample_batch(seed, boxes, anchors, **kwargs):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(boxes))
    fn = jax.jit(jax.vmap(lambda k, b: box_ops.sample_augmented_box(k, b, anchors, **kwargs)))
    return np.asarray(fn(keys, jnp.asarray(boxes))), keys


def test_sampler_draws_nms_survivors_above_the_threshold():
    anchors = box_ops.anchor_grid(CANVAS)
    true_box = np.array([60.0, 40.0, 190.0, 150.0], np.float32)
    draws, keys = _sample_batch(0, np.repeat(true_box[None], 200, 0), anchors)
    ious = np.array([_iou_ref(d, true_box) for d in draws])
    assert np.all(ious > 0.5)
    # Every draw is an anchor and a survivor of the reference NMS run with the same random scores.
    candidates = np.array([_iou_ref(a, true_box) > 0.5 for a in anchors])
    for key, draw in list(zip(keys, draws))[:20]:
        score_key, _ = jax.random.split(key)
        scores = np.asarray(jax.random.uniform(score_key, (len(anchors),)))
        survivors = anchors[_nms_ref(anchors, scores, 0.7, candidates)]
        assert any(np.array_equal(draw, s) for s in survivors)
    distinct = {tuple(d) for d in draws}
    assert len(distinct) > 5, "the sampler must cover more than one survivor"


def test_sampler_falls_back_to_top_k_for_a_tiny_box():
    anchors = box_ops.anchor_grid(CANVAS)
    tiny = np.array([100.0, 100.0, 104.0, 103.0], np.float32)
    assert max(_iou_ref(a, tiny) for a in anchors) <= 0.5
    draws, _ = _sample_batch(1, np.repeat(tiny[None], 16, 0), anchors, fallback_top_k=40)
    ious_all = np.array([_iou_ref(a, tiny) for a in anchors])
    top = set(np.argsort(-ious_all, kind="stable")[:40])
    for draw in draws:
        index = int(np.flatnonzero(np.all(anchors == draw, axis=1))[0])
        assert index in top
    assert len({tuple(d) for d in draws}) > 1


def test_sampler_under_pmap_on_eight_devices():
    anchors = box_ops.anchor_grid((128, 128))
    rng = np.random.default_rng(3)
    xy = rng.uniform(10, 60, size=(8, 4, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(40, 90, size=(8, 4, 2))], -1).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 32).reshape(8, 4, -1)

    def per_device(k, b):
        return jax.vmap(lambda kk, bb: box_ops.sample_augmented_box(kk, bb, anchors))(k, b)

    out = np.asarray(jax.pmap(per_device)(keys, boxes))
    single = np.asarray(jax.jit(jax.vmap(per_device))(keys, boxes))
    np.testing.assert_array_equal(out, single)
    for d in range(8):
        for i in range(4):
            if max(_iou_ref(a, boxes[d, i]) for a in anchors) > 0.5:
                assert _iou_ref(out[d, i], boxes[d, i]) > 0.5
