"""Pixel augmentation (tf.data and JAX versions) against numpy/PIL references written from the definitions."""
import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
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


@pytest.mark.parametrize("backend", ["tf", "jax"])
def test_color_jitter_applies_ops_in_given_order(backend):
    x = rand_image(3)
    factors = np.array([1.3, 0.7, 1.35, 0.08], np.float32)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        want = x.astype(np.float64)
        for op in order:
            want = NP_OPS[op](want, factors[op])
        if backend == "tf":
            got = augment.color_jitter(tf.constant(x), tf.constant(factors), tf.constant(order, tf.int32))
        else:
            got = augment_jax.color_jitter(jnp.asarray(x), jnp.asarray(factors), jnp.asarray(order))
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-3)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_matches_separable_gaussian(sigma):
    x = rand_image(4, 32, 40)
    want = np_blur(x, sigma)
    np.testing.assert_allclose(augment.gaussian_blur(tf.constant(x), sigma), want, atol=1e-3)
    np.testing.assert_allclose(augment_jax.gaussian_blur(jnp.asarray(x), sigma), want, atol=1e-3)


def test_blur_close_to_pil_gaussian_radius_sigma():
    # MoCo blurs with PIL's GaussianBlur(radius=sigma) (box-blur approximation); ours stays within a few
    # gray levels of it on a natural-ish image (smooth gradient plus edges).
    yy, xx = np.mgrid[:64, :64]
    img = np.stack([xx * 4, yy * 4, ((xx // 8 + yy // 8) % 2) * 255], -1).astype(np.uint8)
    for sigma in (0.5, 1.0, 2.0):
        pil = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma)), np.float32)
        ours = augment.gaussian_blur(tf.constant(img, tf.float32), sigma).numpy()
        assert np.abs(ours - pil)[8:-8, 8:-8].mean() < 2.0


def test_flip_maps_image_and_box():
    x = np.zeros((40, 60, 3), np.float32)
    box = np.array([5, 10, 25, 30], np.float32)
    x[10:30, 5:25] = 255
    img, fbox = augment.flip(tf.constant(x), tf.constant(box))
    np.testing.assert_array_equal(fbox, [60 - 25, 10, 60 - 5, 30])
    ys, xs = np.nonzero(img.numpy()[..., 0])
    np.testing.assert_array_equal([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], fbox)


def test_normalize():
    x = rand_image(5)
    want = (x - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    np.testing.assert_allclose(augment.normalize(tf.constant(x)), want, rtol=1e-5, atol=1e-5)


def _params(count):
    ds = tf.data.Dataset.range(count).map(
        lambda i: augment.sample_params(tf.stack([tf.cast(i, tf.int32), 5])))
    return {k: v.numpy() for k, v in next(iter(ds.batch(count))).items()}


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


def test_augment_full_chain_tf_and_jax_match_numpy():
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
    tf_img, tf_box = augment.augment(tf.constant(x), tf.constant(box), params)
    jx_img, jx_box = jax.jit(augment_jax.augment)(x, box, *params.values())
    for img, b in ((tf_img, tf_box), (jx_img, jx_box)):
        np.testing.assert_allclose(np.asarray(img), want, atol=2e-4)
        np.testing.assert_array_equal(np.asarray(b), [48 - 20, 4, 48 - 3, 30])


def test_augment_without_ops_only_normalises():
    x = np.random.default_rng(7).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    params = {"apply": np.zeros(4, bool), "factors": np.ones(4, np.float32),
              "order": np.arange(4, dtype=np.int32), "sigma": np.float32(1.0)}
    img, box = augment.augment(tf.constant(x), tf.constant([1.0, 2.0, 3.0, 4.0]), params)
    np.testing.assert_allclose(img, (x - np.array([123.675, 116.28, 103.53])) / [58.395, 57.12, 57.375],
                               atol=1e-5)
    np.testing.assert_array_equal(box, [1, 2, 3, 4])
