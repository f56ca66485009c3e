"""Copy-paste composition against REFERENCE section 1, with numpy references written from the spec."""
import math

import numpy as np
import pytest
from PIL import Image

from image_reference import np_bilinear
from insloc_jax.data import compose

CANVAS = 256


def np_reference_views(rng, height, width, count, size_range=(128, 255)):
    """Crop area fraction, log aspect and pasted (w, h) drawn by the spec's algorithm in numpy."""
    area_frac, log_aspect, sizes = [], [], []
    for _ in range(count):
        for _ in range(10):
            area = height * width * rng.uniform(0.2, 1.0)
            ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                break
        else:
            w, h = width, height  # square test images never need the aspect cut
        tw, th = rng.integers(*size_range, size=2)
        factor = min(max(tw, th) / max(w, h), min(tw, th) / min(w, h))
        area_frac.append(w * h / (height * width))
        log_aspect.append(math.log(w / h))
        sizes.append((int(w * factor + 0.5), int(h * factor + 0.5)))
    return np.array(area_frac), np.array(log_aspect), np.array(sizes)


def _view_rng(i, stream=7):
    return np.random.default_rng([i, stream])


def _layers(image, count, canvas=CANVAS, size_range=(128, 255)):
    """Boxes of `count` views of `image`, one generator per view (seeds [i, 7])."""
    return np.stack([compose.foreground(image, _view_rng(i), canvas, size_range)[1] for i in range(count)])


def _crops(height, width, count, **kwargs):
    return np.array([compose.sample_crop(_view_rng(i, 3), height, width, **kwargs) for i in range(count)])


def test_boxes_inside_canvas_and_sizes_in_range():
    image = np.zeros([300, 500, 3], np.uint8)
    boxes = _layers(image, 2000)
    assert boxes.dtype == np.float32
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= CANVAS).all()
    assert (w >= 1).all() and (h >= 1).all() and (np.maximum(w, h) <= 254).all()
    assert np.array_equal(boxes, np.round(boxes))
    # The top-left corner is uniform over the free range: its relative position has mean 1/2, var 1/12.
    rel = boxes[:, 0] / (CANVAS - w)
    assert abs(rel.mean() - 0.5) < 0.03 and abs(rel.var() - 1 / 12) < 0.01


def test_paste_corner_reaches_both_ends():
    # Near-canvas-sized pastes leave a few free pixels: both the first and the last corner must occur.
    boxes = _layers(np.zeros([300, 300, 3], np.uint8), 600, size_range=(240, 255))
    free_x, free_y = CANVAS - boxes[:, 2], CANVAS - boxes[:, 3]
    assert (boxes[:, 0] == 0).any() and (free_x == 0).any()
    assert (boxes[:, 1] == 0).any() and (free_y == 0).any()


def test_crop_statistics_match_spec():
    rng = np.random.default_rng(0)
    side, count = 400, 3000
    crops = _crops(side, side, count)
    top, left, h, w = crops.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= side).all() and (left + w <= side).all()
    ref_area, ref_aspect, _ = np_reference_views(rng, side, side, count)
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    np.testing.assert_allclose(np.quantile(h * w / side**2, quantiles), np.quantile(ref_area, quantiles),
                               atol=0.03)
    np.testing.assert_allclose(np.quantile(np.log(w / h), quantiles), np.quantile(ref_aspect, quantiles),
                               atol=0.06)
    # The crop offset is uniform over the free range.
    free = side - w
    rel = left[free > 20] / free[free > 20]
    assert abs(rel.mean() - 0.5) < 0.03


def test_pasted_size_statistics_match_spec():
    rng = np.random.default_rng(1)
    count = 3000
    boxes = _layers(np.zeros([400, 400, 3], np.uint8), count)
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
    _, _, ref = np_reference_views(rng, 400, 400, count)
    for stat in (lambda s: s.max(1), lambda s: s.min(1), lambda s: s[:, 0] / s[:, 1]):
        np.testing.assert_allclose(np.quantile(stat(size), [0.1, 0.5, 0.9]),
                                   np.quantile(stat(ref), [0.1, 0.5, 0.9]), rtol=0.04)


@pytest.mark.parametrize("crop,target", [((300, 100), (200, 150)), ((50, 60), (254, 128)),
                                         ((77, 77), (128, 200)), ((1000, 3), (130, 140))])
def test_fit_size_keeps_aspect_within_target(crop, target):
    new_h, new_w = compose.fit_size(crop[0], crop[1], target[0], target[1])
    assert type(new_h) is int and type(new_w) is int
    long_t, short_t = max(target), min(target)
    assert max(new_h, new_w) <= long_t and min(new_h, new_w) <= short_t
    factor = min(long_t / max(crop), short_t / min(crop))
    assert (new_h, new_w) == (max(1, int(crop[0] * factor + 0.5)), max(1, int(crop[1] * factor + 0.5)))
    # Tight: one of the two bounds is met up to rounding.
    assert max(new_h, new_w) >= long_t - 1 or min(new_h, new_w) >= short_t - 1


def test_centre_crop_fallback_for_extreme_aspect():
    crops = _crops(10, 1000, 50)
    # No try fits (heights >= 14 > 10): torchvision crops the whole height at the widest allowed ratio 2.
    np.testing.assert_array_equal(crops, np.tile([[0, 490, 10, 20]], (50, 1)))
    # Tall images are cut the other way: the whole width at the narrowest ratio 1/2.
    np.testing.assert_array_equal(_crops(1000, 10, 5), np.tile([[490, 0, 20, 10]], (5, 1)))


def test_draws_follow_documented_order():
    # sample_crop: u = random((tries, 2)), then top, then left; foreground: crop, target (w, h), y, x.
    for i in range(20):
        rng, twin = _view_rng(i), _view_rng(i)
        top, left, h, w = compose.sample_crop(rng, 300, 500)
        u = twin.random((10, 2))
        for u_area, u_ratio in u:
            area = 300 * 500 * (0.2 + 0.8 * u_area)
            ratio = math.exp(math.log(0.5) + (math.log(2.0) - math.log(0.5)) * u_ratio)
            want_w, want_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < want_w <= 500 and 0 < want_h <= 300:
                break
        assert (h, w) == (want_h, want_w)
        assert (top, left) == (twin.integers(0, 300 - h + 1), twin.integers(0, 500 - w + 1))
        assert rng.random() == twin.random()  # both streams consumed the same draws

        rng, twin = _view_rng(i, 8), _view_rng(i, 8)
        image = np.zeros((300, 500, 3), np.uint8)
        patch, box = compose.foreground(image, rng)
        _, _, ch, cw = compose.sample_crop(twin, 300, 500)
        tw, th = twin.integers(128, 255, size=2)
        new_h, new_w = compose.fit_size(ch, cw, tw, th)
        y, x = twin.integers(0, CANVAS - new_h + 1), twin.integers(0, CANVAS - new_w + 1)
        np.testing.assert_array_equal(box, [x, y, x + new_w, y + new_h])
        assert patch.shape == (new_h, new_w, 3) and patch.dtype == np.uint8


def test_same_seed_same_views():
    image = np.random.default_rng(5).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    for i in range(5):
        (p1, b1), (p2, b2) = (compose.foreground(image, _view_rng(i)) for _ in range(2))
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(b1, b2)
        (v1, _), (v2, _) = (compose.moco_view(image, _view_rng(i, 9)) for _ in range(2))
        np.testing.assert_array_equal(v1, v2)
        assert compose.sample_crop(_view_rng(i), 50, 60) == compose.sample_crop(_view_rng(i), 50, 60)
    # Different seeds give different views.
    assert len({tuple(compose.foreground(image, _view_rng(i))[1]) for i in range(20)}) > 15


def test_paste_pixels_are_rescaled_crop_and_background_elsewhere():
    height, width = 200, 250
    yy, xx = np.mgrid[:height, :width]
    coded = np.stack([xx, yy, np.full_like(xx, 77)], -1).astype(np.uint8)
    texture = np.random.default_rng(2).integers(0, 256, (height, width, 3), dtype=np.uint8)
    background = np.random.default_rng(3).integers(0, 256, (CANVAS, CANVAS, 3), dtype=np.uint8)
    for s in range(5):
        patch, box = compose.foreground(coded, _view_rng(s, 11))
        x1, y1, x2, y2 = box.astype(int)
        out = compose.paste(patch, box, background)
        assert out.shape == (CANVAS, CANVAS, 3) and out.dtype == np.uint8
        outside = np.ones((CANVAS, CANVAS), bool)
        outside[y1:y2, x1:x2] = False
        np.testing.assert_array_equal(out[outside], background[outside])
        # The coordinate-coded image reveals the crop window: first/last sampled source column and row.
        patch = out[y1:y2, x1:x2].astype(float)
        cx0, cy0 = _window_start(patch[0, :, 0], x2 - x1), _window_start(patch[:, 0, 1], y2 - y1)
        cw, ch = _window_length(patch[0, :, 0], x2 - x1), _window_length(patch[:, 0, 1], y2 - y1)
        assert cx0 >= 0 and cy0 >= 0 and cx0 + cw <= width and cy0 + ch <= height
        # The rescale kept the crop's aspect ratio (up to rounding of the pasted size).
        assert abs(math.log((x2 - x1) / (y2 - y1)) - math.log(cw / ch)) < 0.03
        # Same seed and shape give the same window on any content: compare with the numpy rescale.
        patch_t, box_t = compose.foreground(texture, _view_rng(s, 11))
        np.testing.assert_array_equal(box_t, box)
        got = compose.paste(patch_t, box_t, background)[y1:y2, x1:x2]
        want = np_bilinear(texture[cy0:cy0 + ch, cx0:cx0 + cw], y2 - y1, x2 - x1)
        assert np.abs(got - want).max() <= 1.01


def test_paste_leaves_background_untouched():
    background = np.random.default_rng(12).integers(0, 256, (CANVAS, CANVAS, 3), dtype=np.uint8)
    before = background.copy()
    patch = np.full((40, 60, 3), 9, np.uint8)
    out = compose.paste(patch, np.array([10, 20, 70, 60], np.float32), background)
    np.testing.assert_array_equal(background, before)
    assert not np.shares_memory(out, background)
    assert (out[20:60, 10:70] == 9).all()
    # Into a given buffer (a batch slot): the same composite, background still untouched.
    batch = np.zeros((2, CANVAS, CANVAS, 3), np.uint8)
    got = compose.paste(patch, np.array([10, 20, 70, 60], np.float32), background, out=batch[1])
    assert np.shares_memory(got, batch[1])
    np.testing.assert_array_equal(batch[1], out)
    np.testing.assert_array_equal(background, before)


def _window_length(values, out_len):
    """Crop length from the slope of the sampled coordinates (half-pixel bilinear)."""
    j = np.arange(out_len)
    interior = (j > 2) & (j < out_len - 3)
    slope = np.polyfit(j[interior], values[interior], 1)[0]
    return int(round(slope * out_len))


def _window_start(values, out_len):
    j = np.arange(out_len)
    interior = (j > 2) & (j < out_len - 3)
    slope, intercept = np.polyfit(j[interior], values[interior], 1)
    return int(round(intercept - 0.5 * slope + 0.5))


@pytest.mark.parametrize("size", [(97, 131), (256, 256), (300, 410), (64, 32)])
def test_resize_without_antialias_is_half_pixel_bilinear(size):
    # On a strided crop window, as foreground passes it.
    image = np.random.default_rng(13).integers(0, 256, (220, 260, 3), dtype=np.uint8)
    crop = image[10:210, 30:230]
    got = compose.resize_uint8(crop, size)
    assert got.shape == size + (3,) and got.dtype == np.uint8
    assert np.abs(got - np_bilinear(crop, *size)).max() <= 1.01


@pytest.mark.parametrize("size", [(224, 224), (97, 131), (400, 300)])
def test_antialiased_resize_is_pil_bilinear(size):
    image = np.random.default_rng(14).integers(0, 256, (220, 260, 3), dtype=np.uint8)
    crop = image[15:200, 7:250]
    got = compose.resize_uint8(crop, size, antialias=True)
    want = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size[::-1], Image.BILINEAR))
    assert got.shape == size + (3,) and got.dtype == np.uint8 and got.flags.writeable
    np.testing.assert_array_equal(got, want)


def test_moco_view_shape_and_box():
    image = np.random.default_rng(4).integers(0, 256, (180, 320, 3), dtype=np.uint8)
    view, box = compose.moco_view(image, np.random.default_rng([1, 2]))
    assert view.shape == (224, 224, 3) and view.dtype == np.uint8
    assert box.dtype == np.float32
    np.testing.assert_array_equal(box, [0, 0, 224, 224])
    # The view is torchvision's resized crop of the window sample_crop draws from the same generator.
    top, left, h, w = compose.sample_crop(np.random.default_rng([1, 2]), 180, 320,
                                          log_ratio=compose.MOCO_LOG_RATIO)
    want = Image.fromarray(image).crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
    np.testing.assert_array_equal(view, np.asarray(want))


def test_moco_crop_uses_torchvision_ratio_range():
    top, left, h, w = _crops(300, 300, 1000, log_ratio=compose.MOCO_LOG_RATIO).T
    log_aspect = np.log(w / h)
    # Rounding to whole pixels moves the aspect by at most ~1/sqrt(0.2 * 300^2) in log terms.
    assert log_aspect.min() >= math.log(3 / 4) - 0.02 and log_aspect.max() <= math.log(4 / 3) + 0.02
    assert log_aspect.min() < math.log(3 / 4) + 0.03 and log_aspect.max() > math.log(4 / 3) - 0.03
