"""Pixel augmentation (host numpy/OpenCV and JAX versions) against numpy/PIL references written from the definitions."""
import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFilter

from insloc_jax.data import augment, augment_jax

LUMA = np.array([0.299, 0.587, 0.114])


def rand_image(seed, h=24, w=20):
    return np.random.default_rng(seed).uniform(0, 255, (h, w, 3)).astype(np.float32)


# numpy references, from torchvision's definitions (float images in 0..255, clamped after each op)
def np_brightness(x, f):
    return np.clip(f * x, 0, 255)


def np_contrast(x, f):
    mean = (x @ LUMA).mean()
    return np.clip(f * x + (1 - f) * mean, 0, 255)


def np_saturation(x, f):
    return np.clip(f * x + (1 - f) * (x @ LUMA)[..., None], 0, 255)


def np_hue(x, shift):
    out = np.empty_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(x[idx] / 255.0))
        out[idx] = np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255.0
    return np.clip(out, 0, 255)


def np_blur(x, sigma, radius=6):
    taps = np.arange(-radius, radius + 1)
    k = np.exp(-taps**2 / (2 * sigma**2))
    k /= k.sum()
    p = np.pad(x.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = sum(k[i] * p[i:i + x.shape[0]] for i in range(len(k)))
    return sum(k[i] * rows[:, i:i + x.shape[1]] for i in range(len(k)))


NP_OPS = [np_brightness, np_contrast, np_saturation, np_hue]


def test_brightness_contrast_saturation_match_definitions():
    x = rand_image(0)
    for f in (0.6, 0.93, 1.4):
        np.testing.assert_allclose(augment.adjust_brightness(x, f), np_brightness(x, f), atol=1e-3)
        np.testing.assert_allclose(augment.adjust_contrast(x, f), np_contrast(x, f), atol=1e-3)
        np.testing.assert_allclose(augment.adjust_saturation(x, f), np_saturation(x, f), atol=1e-3)


@pytest.mark.parametrize("shift", [-0.1, -0.03, 0.05, 0.1, 0.5])
def test_hue_matches_colorsys(shift):
    x = rand_image(1)
    x[0, :4] = [[10, 10, 10], [200, 50, 50], [50, 200, 50], [50, 50, 200]]  # gray and pure hues
    np.testing.assert_allclose(augment.adjust_hue(x, shift), np_hue(x, shift), atol=2e-3)
    np.testing.assert_allclose(augment_jax.adjust_hue(jnp.asarray(x), shift), np_hue(x, shift), atol=2e-3)


def test_grayscale_is_itu_601_luma_like_pil():
    x = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(x).convert("L"), np.float32)
    for ours in (augment.gray(x.astype(np.float32)), augment_jax.gray(jnp.asarray(x, jnp.float32))):
        assert np.abs(np.round(np.asarray(ours)[..., 0]) - pil).max() <= 1


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_color_jitter_applies_ops_in_given_order(backend):
    x = rand_image(3)
    factors = np.array([1.3, 0.7, 1.35, 0.08], np.float32)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        want = x.astype(np.float64)
        for op in order:
            want = NP_OPS[op](want, factors[op])
        if backend == "numpy":
            got = augment.color_jitter(x, factors, np.array(order, np.int32))
        else:
            got = augment_jax.color_jitter(jnp.asarray(x), jnp.asarray(factors), jnp.asarray(order))
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-3)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_matches_separable_gaussian(sigma):
    x = rand_image(4, 32, 40)
    want = np_blur(x, sigma)
    np.testing.assert_allclose(augment.gaussian_blur(x, sigma), want, atol=1e-3)
    np.testing.assert_allclose(augment_jax.gaussian_blur(jnp.asarray(x), sigma), want, atol=1e-3)


def test_blur_close_to_pil_gaussian_radius_sigma():
    # MoCo blurs with PIL's GaussianBlur(radius=sigma) (box-blur approximation); ours stays within a few
    # gray levels of it on a natural-ish image (smooth gradient plus edges).
    yy, xx = np.mgrid[:64, :64]
    img = np.stack([xx * 4, yy * 4, ((xx // 8 + yy // 8) % 2) * 255], -1).astype(np.uint8)
    for sigma in (0.5, 1.0, 2.0):
        pil = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma)), np.float32)
        ours = augment.gaussian_blur(img.astype(np.float32), sigma)
        assert np.abs(ours - pil)[8:-8, 8:-8].mean() < 2.0


def test_flip_maps_image_and_box():
    x = np.zeros((40, 60, 3), np.float32)
    box = np.array([5, 10, 25, 30], np.float32)
    x[10:30, 5:25] = 255
    img, fbox = augment.flip(x, box)
    assert fbox.dtype == np.float32
    np.testing.assert_array_equal(fbox, [60 - 25, 10, 60 - 5, 30])
    ys, xs = np.nonzero(img[..., 0])
    np.testing.assert_array_equal([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], fbox)


def test_normalize():
    x = rand_image(5)
    want = (x - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    np.testing.assert_allclose(augment.normalize(x), want, rtol=1e-5, atol=1e-5)


def _params(count):
    """Parameters of `count` views, one generator per view (seeds [i, 5]), stacked per key."""
    draws = [augment.sample_params(np.random.default_rng([i, 5])) for i in range(count)]
    return {k: np.stack([d[k] for d in draws]) for k in draws[0]}


def test_sampled_parameters_have_spec_distribution():
    p = _params(4000)
    np.testing.assert_allclose(p["apply"].mean(0), [0.8, 0.2, 0.5, 0.5], atol=0.025)
    f = p["factors"]
    assert (f[:, :3] >= 0.6).all() and (f[:, :3] <= 1.4).all() and (np.abs(f[:, 3]) <= 0.1).all()
    np.testing.assert_allclose(f.mean(0), [1, 1, 1, 0], atol=0.02)
    np.testing.assert_allclose(f.std(0), [0.8 / 12**0.5] * 3 + [0.2 / 12**0.5], rtol=0.05)
    assert (np.sort(p["order"], 1) == np.arange(4)).all()
    assert len({tuple(o) for o in p["order"]}) == 24  # every order occurs
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0 and abs(p["sigma"].mean() - 1.05) < 0.03


def test_sampling_is_deterministic():
    a, b = _params(50), _params(50)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_augment_full_chain_host_and_jax_match_numpy():
    x = np.random.default_rng(6).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    box = np.array([3, 4, 20, 30], np.float32)
    params = {"apply": np.array([True, True, True, True]), "factors": np.array([1.2, 0.8, 1.1, -0.05],
                                                                                np.float32),
              "order": np.array([1, 3, 0, 2], np.int32), "sigma": np.float32(1.3)}
    want = x.astype(np.float64)
    for op in params["order"]:
        want = NP_OPS[op](want, params["factors"][op])
    want = np_blur(np.repeat(want @ LUMA, 3).reshape(want.shape), 1.3)[:, ::-1]
    want = (want - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    np_img, np_box = augment.augment(x, box, params)
    jx_img, jx_box = jax.jit(augment_jax.augment)(x, box, *params.values())
    for img, b in ((np_img, np_box), (jx_img, jx_box)):
        np.testing.assert_allclose(np.asarray(img), want, atol=2e-4)
        np.testing.assert_array_equal(np.asarray(b), [48 - 20, 4, 48 - 3, 30])


def test_augment_without_ops_only_normalises():
    x = np.random.default_rng(7).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    params = {"apply": np.zeros(4, bool), "factors": np.ones(4, np.float32),
              "order": np.arange(4, dtype=np.int32), "sigma": np.float32(1.0)}
    img, box = augment.augment(x, np.array([1.0, 2.0, 3.0, 4.0], np.float32), params)
    assert img.dtype == np.float32 and box.dtype == np.float32
    np.testing.assert_allclose(img, (x - np.array([123.675, 116.28, 103.53])) / [58.395, 57.12, 57.375],
                               atol=1e-5)
    np.testing.assert_array_equal(box, [1, 2, 3, 4])


def test_sampled_parameters_types_and_draw_order():
    # Documented order: u = random(13); apply <- u[0:4], factors <- u[4:8], order <- u[8:12], sigma <- u[12].
    for i in range(10):
        p = augment.sample_params(np.random.default_rng([i, 5]))
        u = np.random.default_rng([i, 5]).random(13)
        assert p["apply"].dtype == bool and p["apply"].shape == (4,)
        assert p["factors"].dtype == np.float32 and p["factors"].shape == (4,)
        assert p["order"].dtype == np.int32 and p["order"].shape == (4,)
        assert isinstance(p["sigma"], np.float32)
        np.testing.assert_array_equal(p["apply"], u[:4] < [0.8, 0.2, 0.5, 0.5])
        np.testing.assert_allclose(p["factors"], np.append(0.6 + 0.8 * u[4:7], 0.1 * (2 * u[7] - 1)), rtol=1e-6)
        np.testing.assert_array_equal(p["order"], np.argsort(u[8:12]))
        np.testing.assert_allclose(p["sigma"], 0.1 + 1.9 * u[12], rtol=1e-6)


def test_ops_leave_their_input_untouched():
    x = rand_image(8)
    before = x.copy()
    for out in (augment.adjust_brightness(x, 1.2), augment.adjust_contrast(x, 0.7),
                augment.adjust_saturation(x, 1.3), augment.adjust_hue(x, 0.05),
                augment.color_jitter(x, np.array([1.2, 0.7, 1.3, 0.05], np.float32), np.arange(4)),
                augment.gaussian_blur(x, 1.0), augment.flip(x, np.zeros(4, np.float32))[0],
                augment.normalize(x)):
        assert not np.shares_memory(out, x)
    np.testing.assert_array_equal(x, before)
    image = np.random.default_rng(9).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    kept = image.copy()
    params = {"apply": np.ones(4, bool), "factors": np.array([1.2, 0.8, 1.1, -0.05], np.float32),
              "order": np.array([1, 3, 0, 2], np.int32), "sigma": np.float32(1.3)}
    augment.augment(image, np.zeros(4, np.float32), params)
    np.testing.assert_array_equal(image, kept)


def test_host_augment_matches_device_augment_on_sampled_params():
    # The pipeline applies the same parameters on the host (augment.augment) or in the jitted step
    # (augment_jax.augment); both must agree on normalised pixels. Random images and sampled parameters,
    # the first six with every op on (jitter order and hue sign vary with the seed).
    device = jax.jit(augment_jax.augment)
    results = []
    for i in range(24):
        rng = np.random.default_rng([i, 21])
        image = rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)
        box = np.array([3, 5, 40, 60], np.float32)
        params = augment.sample_params(rng)
        if i < 6:
            params["apply"][:] = True
        host_img, host_box = augment.augment(image, box, params)
        dev_img, dev_box = device(image, box, params["apply"], params["factors"], params["order"],
                                  params["sigma"])
        assert host_img.dtype == np.float32 and host_img.shape == (64, 72, 3)
        np.testing.assert_allclose(host_img, np.asarray(dev_img), atol=1e-4, rtol=0)
        np.testing.assert_array_equal(host_box, np.asarray(dev_box))
        results.append((host_img, host_img.copy()))
    # Later calls (which reuse a scratch buffer) never overwrite an earlier result.
    for got, copy in results:
        np.testing.assert_array_equal(got, copy)


def test_augment_into_given_buffer_matches_new_array():
    batch = np.full((3, 20, 24, 3), np.nan, np.float32)
    for i in range(3):
        rng = np.random.default_rng([i, 30])
        image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        params = augment.sample_params(rng)
        params["apply"][:] = [True, i == 1, True, i != 2]
        want, want_box = augment.augment(image, np.array([1, 2, 9, 12], np.float32), params)
        got, got_box = augment.augment(image, np.array([1, 2, 9, 12], np.float32), params, out=batch[i])
        assert np.shares_memory(got, batch[i])
        np.testing.assert_array_equal(batch[i], want)
        np.testing.assert_array_equal(got_box, want_box)
    with pytest.raises(ValueError):
        augment.augment(image, np.zeros(4, np.float32), params, out=np.zeros((20, 24, 3), np.float64))
