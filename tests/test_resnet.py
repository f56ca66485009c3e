"""ResNet: torchvision parity (eval and train mode), parameter counts, init, C4 truncation.

The reference is `insloc_torch.models.ResNet`, written with torchvision's module names; it loads
`export.to_torchvision` with strict=True. Odd input sizes exercise torch's symmetric padding of strided
convs and of the max pool.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from insloc_jax import export
from insloc_jax.models.encoder import Encoder
from insloc_jax.models.resnet import ResNet
from parity import from_nchw, load_strict, randomize_batchnorm, rel_err, to_nchw
from insloc_torch.models import ResNet as TorchResNet  # torchvision structure and names

# torchvision resnetN parameter counts minus the fc layer (512 * 1000 + 1000 or 2048 * 1000 + 1000).
TORCHVISION_PARAMS_NO_FC = {18: 11_689_512 - 513_000, 34: 21_797_672 - 513_000,
                            50: 25_557_032 - 2_049_000, 101: 44_549_160 - 2_049_000}


def _as_encoder(params, stats):
    """A bare ResNet's variables placed where an Encoder keeps its backbone (what export reads)."""
    return {"params": {"backbone": params}, "batch_stats": {"backbone": stats}}


def _param_count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_counts_match_torchvision(depth):
    shapes = jax.eval_shape(lambda: ResNet(depth).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), False))
    torch_count = sum(p.numel() for p in TorchResNet(depth, 64).parameters())
    assert _param_count(shapes["params"]) == torch_count == TORCHVISION_PARAMS_NO_FC[depth]
    if depth == 50:
        assert torch_count == 23_508_032


def test_resnet50_eval_parity_with_torchvision_names():
    images = np.random.default_rng(0).normal(size=(2, 67, 61, 3)).astype(np.float32)
    model = ResNet(50)
    variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 67, 61, 3)), False)
    variables = randomize_batchnorm(variables, seed=2)
    ours = jax.jit(lambda v, x: model.apply(v, x, False))(variables, images)

    exported = export.to_torchvision(_as_encoder(variables["params"], variables["batch_stats"]))
    reference = load_strict(TorchResNet(50, 64), exported)
    with torch.no_grad():
        theirs = reference(to_nchw(images))
    for name, size in (("res2", (17, 16)), ("res3", (9, 8)), ("res4", (5, 4)), ("res5", (3, 2))):
        assert ours[name].shape[1:3] == size
        err = rel_err(ours[name], from_nchw(theirs[name]))
        assert err <= 1e-4, (name, err)


def test_train_mode_outputs_and_running_stats_match_torch():
    """Batch statistics, unbiased running variance and momentum 0.1 behave as torch's BatchNorm2d."""
    images = np.random.default_rng(3).normal(size=(4, 33, 35, 3)).astype(np.float32)
    model = ResNet(18)
    variables = randomize_batchnorm(model.init(jax.random.PRNGKey(4), jnp.zeros((1, 33, 35, 3)), False), seed=5)
    ours, updated = model.apply(variables, images, True, mutable=["batch_stats"])

    exported = export.to_torchvision(_as_encoder(variables["params"], variables["batch_stats"]))
    reference = load_strict(TorchResNet(18, 64), exported).train()
    with torch.no_grad():
        theirs = reference(to_nchw(images))
    assert rel_err(ours["res5"], from_nchw(theirs["res5"])) <= 1e-4
    exported = export.to_torchvision(_as_encoder(variables["params"], updated["batch_stats"]))
    torch_state = reference.state_dict()
    for name in ("bn1", "layer1.0.bn2", "layer3.0.downsample.1", "layer4.1.bn2"):
        for stat in ("running_mean", "running_var"):
            np.testing.assert_allclose(exported[f"{name}.{stat}"], torch_state[f"{name}.{stat}"].numpy(),
                                       rtol=1e-4, atol=1e-5, err_msg=f"{name}.{stat}")


def test_init_follows_reference():
    variables = ResNet(50).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False)
    params = variables["params"]
    for kernel in (params["layer1"]["0"]["conv2"]["kernel"], params["layer3"]["2"]["conv1"]["kernel"]):
        k, _, _, out = kernel.shape
        expected = np.sqrt(2.0 / (k * k * out))
        assert abs(float(np.std(kernel)) / expected - 1.0) < 0.05
        # Untruncated normal: some draws lie beyond 2 standard deviations.
        assert float(np.abs(kernel).max()) > 2.5 * expected
    last_bn = params["layer2"]["1"]["bn3"]
    np.testing.assert_array_equal(last_bn["scale"], 1.0)
    np.testing.assert_array_equal(last_bn["bias"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], 1.0)


def test_c4_backbone_stops_after_res4():
    shapes = jax.eval_shape(
        lambda: ResNet(50, num_stages=3).init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)), False)
    )
    outputs, variables = shapes
    assert sorted(outputs) == ["res2", "res3", "res4"]
    assert outputs["res4"].shape == (2, 4, 4, 1024)
    assert "layer4" not in variables["params"]


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    images = np.random.default_rng(6).normal(size=(2, 64, 64, 3)).astype(np.float32)
    boxes = np.zeros((2, 1, 4), np.float32)
    model16 = Encoder("moco", depth=18, width=16, mlp_dim=64, dtype=jnp.bfloat16)
    variables = model16.init(jax.random.PRNGKey(0), images, boxes, train=False)
    assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    feats16 = model16.apply(variables, images, method=Encoder.features)
    emb16 = model16.apply(variables, images, boxes, train=False)
    assert feats16["res5"].dtype == jnp.bfloat16 and emb16.dtype == jnp.float32

    model32 = Encoder("moco", depth=18, width=16, mlp_dim=64)
    feats32 = model32.apply(variables, images, method=Encoder.features)
    emb32 = model32.apply(variables, images, boxes, train=False)
    assert rel_err(np.asarray(feats16["res5"], np.float32), feats32["res5"]) < 5e-2
    cosine = np.sum(np.asarray(emb16) * np.asarray(emb32), axis=-1)
    assert cosine.min() > 0.99
