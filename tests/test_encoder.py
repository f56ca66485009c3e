"""Encoders: PyTorch parity of res2..res5, P2..P5 and embeddings (fpn, c4), moco, full-size shapes.

References: `insloc_torch.models` encoders at the published sizes, named like the original mmdetection
model, loading `export.to_mmdet` with strict=True, in eval mode. Their RoIAlign is `insloc_torch.roi_align`, a
PyTorch transcription of torchvision's definition (no torchvision here), so the embedding comparison checks
our RoIAlign call (levels, scales, aligned offset, adaptive sampling) too.
BatchNorm parameters and statistics are randomised so that eval-mode normalisation is not the identity.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from insloc_jax import export
from insloc_jax.models.encoder import Encoder
from parity import from_nchw, load_strict, randomize_batchnorm, rel_err, to_nchw
from insloc_torch import models

SIZE = 64
TOL = 1e-4


def _images(seed, batch=2, size=SIZE):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _boxes(seed, batch, levels, size=SIZE):
    """Random boxes of 8..56 px inside the image, one per (image, level)."""
    rng = np.random.default_rng(seed)
    wh = rng.uniform(8, 56, (batch, levels, 2))
    xy = rng.uniform(0, 1, (batch, levels, 2)) * (size - wh)
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def _init(model, images, boxes, seed):
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(seed), images, boxes, train=False))()
    return randomize_batchnorm(variables, seed + 1)


def _param_count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def test_fpn_parity_with_mmdet_reference():
    images, boxes = _images(0), _boxes(1, 2, 4)
    model = Encoder("fpn")
    variables = _init(model, images, boxes, seed=2)
    keep = lambda mdl, method: method == "__call__" and mdl.name in ("backbone", "neck")  # noqa: E731
    emb, inter = jax.jit(lambda v: model.apply(v, images, boxes, train=False, capture_intermediates=keep))(
        variables)
    feats = inter["intermediates"]["backbone"]["__call__"][0]
    pyramid = inter["intermediates"]["neck"]["__call__"][0]

    reference = load_strict(models.FPNEncoder(50, 64, 256, 256, 1024, 128), export.to_mmdet(variables, "fpn"))
    assert _param_count(variables["params"]) == sum(p.numel() for p in reference.parameters())
    with torch.no_grad():
        t_feats, t_levels = reference.pyramid(to_nchw(images))
        t_pyramid = {f"p{i + 2}": level for i, level in enumerate(t_levels)}
        t_emb = reference(to_nchw(images), torch.from_numpy(boxes))
    errors = {name: rel_err(feats[name], from_nchw(t_feats[name])) for name in t_feats}
    errors.update({name: rel_err(pyramid[name], from_nchw(t_pyramid[name])) for name in t_pyramid})
    errors["embeddings"] = rel_err(emb, t_emb.numpy())
    assert sorted(errors) == ["embeddings", "p2", "p3", "p4", "p5", "res2", "res3", "res4", "res5"]
    assert max(errors.values()) <= TOL, errors
    assert emb.shape == (2, 4, 128) and emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)


def test_c4_parity_with_mmdet_and_torchvision_references():
    images, boxes = _images(3), _boxes(4, 2, 1)
    model = Encoder("c4")
    variables = _init(model, images, boxes, seed=5)
    emb = jax.jit(lambda v: model.apply(v, images, boxes, train=False))(variables)
    feats = jax.jit(lambda v: model.apply(v, images, method=Encoder.features))(variables)

    reference = load_strict(models.C4Encoder(50, 64, 2048, 128), export.to_mmdet(variables, "c4"))
    assert _param_count(variables["params"]) == sum(p.numel() for p in reference.parameters())
    # The full ResNet (res5 = the RoI head's stage run on the whole res4 map) as torchvision runs it.
    resnet = load_strict(models.ResNet(50, 64), export.to_torchvision(variables))
    with torch.no_grad():
        t_feats, t_emb = reference.backbone(to_nchw(images)), reference(to_nchw(images), torch.from_numpy(boxes))
        tv_feats = resnet(to_nchw(images))
    errors = {name: rel_err(feats[name], from_nchw(t_feats[name])) for name in t_feats}
    errors["res5"] = rel_err(feats["res5"], from_nchw(tv_feats["res5"]))
    errors["embeddings"] = rel_err(emb, t_emb.numpy())
    assert sorted(errors) == ["embeddings", "res2", "res3", "res4", "res5"]
    assert max(errors.values()) <= TOL, errors
    assert emb.shape == (2, 1, 128)


def test_moco_embeds_the_pooled_res5_through_the_mlp():
    images = _images(6, batch=3)
    model = Encoder("moco", depth=18, width=16, mlp_dim=256)
    variables = _init(model, images, np.zeros((3, 1, 4), np.float32), seed=7)
    # Boxes are ignored: any values give the same embedding.
    emb = jax.jit(lambda v: model.apply(v, images, _boxes(8, 3, 1), train=False))(variables)
    res5 = jax.jit(lambda v: model.apply(v, images, method=Encoder.features)["res5"])(variables)
    mlp = variables["params"]["projection"]
    hidden = np.maximum(np.asarray(res5, np.float64).mean((1, 2)) @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"], 0)
    out = hidden @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
    expected = out / np.linalg.norm(out, axis=-1, keepdims=True)
    assert emb.shape == (3, 1, 128)
    assert np.abs(np.asarray(res5)).max() > 0
    np.testing.assert_allclose(emb[:, 0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch, levels", [("fpn", 4), ("c4", 1), ("moco", 1)])
def test_full_size_shapes_through_eval_shape(arch, levels):
    model = Encoder(arch, bn_num_groups=4)
    images = jax.ShapeDtypeStruct((32, 256, 256, 3), jnp.float32)
    boxes = jax.ShapeDtypeStruct((32, levels, 4), jnp.float32)
    variables = jax.eval_shape(lambda x, b: model.init(jax.random.PRNGKey(0), x, b, train=False), images, boxes)
    emb, updated = jax.eval_shape(
        lambda v, x, b: model.apply(v, x, b, train=True, mutable=["batch_stats"]), variables, images, boxes)
    assert emb.shape == (32, levels, 128) and emb.dtype == jnp.float32
    assert jax.tree_util.tree_structure(updated["batch_stats"]) == jax.tree_util.tree_structure(
        variables["batch_stats"])
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method=Encoder.features), variables, images)
    assert {k: v.shape for k, v in feats.items()} == {
        "res2": (32, 64, 64, 256), "res3": (32, 32, 32, 512), "res4": (32, 16, 16, 1024), "res5": (32, 8, 8, 2048)}
    if arch == "fpn":
        pyramid = jax.eval_shape(lambda v, x: model.apply(v, x, method=Encoder.pyramid), variables, images)
        assert {k: v.shape for k, v in pyramid.items()} == {
            f"p{i}": (32, 256 // 2**i, 256 // 2**i, 256) for i in range(2, 6)}


def test_ghost_groups_in_the_encoder_equal_per_device_training():
    """One device with G ghost groups == G devices with per-device BN (tiny FPN, train mode)."""
    devices, per_device = 4, 2
    kwargs = dict(depth=18, width=8, fpn_dim=16, head_conv_dim=16, head_fc_dim=32, dim=16)
    images, boxes = _images(9, batch=devices * per_device), _boxes(10, devices * per_device, 4)
    ghost = Encoder("fpn", bn_num_groups=devices, **kwargs)
    variables = randomize_batchnorm(_init(ghost, images, boxes, seed=11), 12)
    emb, stats = jax.jit(lambda v: ghost.apply(v, images, boxes, train=True, mutable=["batch_stats"]))(variables)

    plain = Encoder("fpn", **kwargs)
    replicated = jax.tree_util.tree_map(lambda a: np.stack([a] * devices), variables)
    shard = lambda a: a.reshape(devices, per_device, *a.shape[1:])  # noqa: E731
    emb_dev, stats_dev = jax.pmap(lambda v, x, b: plain.apply(v, x, b, train=True, mutable=["batch_stats"]),
                                  devices=jax.local_devices()[:devices])(replicated, shard(images), shard(boxes))
    np.testing.assert_allclose(emb, np.asarray(emb_dev).reshape(emb.shape), rtol=1e-4, atol=1e-5)
    mean_dev = jax.tree_util.tree_map(lambda a: np.asarray(a).mean(0), stats_dev)
    for ours, theirs in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(mean_dev)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="arch"):
        Encoder("detr").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 1, 4)), train=False)


def test_pooling_is_exact_for_anchors_larger_than_the_feature_map():
    # A 64-px canvas's res4 is 4x4; a box-augmentation anchor of 362 x 181 px spans 22.6 x 11.3 cells, which
    # adaptive sampling averages over 2 samples per bin side, one more than the map's own bound allows.
    from roi_align_reference import roi_align_numpy

    features = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    boxes = np.array([[-149.0, -58.5, 213.0, 122.5], [10.0, 12.0, 50.0, 60.0]], np.float32)
    want = roi_align_numpy(features, boxes, np.arange(2), (14, 14), 1 / 16, 0, True)

    def pool(side):
        encoder = Encoder("c4", depth=18, width=8, roi_max_side=side)
        return np.asarray(encoder.apply({}, jnp.asarray(features), jnp.asarray(boxes), 14, 1 / 16,
                                        method=Encoder._pool))

    np.testing.assert_allclose(pool(362.0), want, atol=1e-6)
    assert np.abs(pool(0.0)[0] - want[0]).max() > 1e-3  # the map's bound alone is not enough
    np.testing.assert_allclose(pool(0.0)[1], want[1], atol=1e-6)  # a box inside the image is exact anyway
