"""The analytic FLOP counter against hand counts, torchvision's published figures and XLA's cost analysis."""
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from insloc_jax import flops
from insloc_jax.models.encoder import Encoder


def xla_flops(fn, *args) -> float:
    """FLOPs XLA's cost analysis reports for jit(fn)(*args)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_conv_hand_count():
    # 3x3 stride 2 on 9x9: torch output side (9 + 2 - 3) // 2 + 1 = 5; 25 outputs x 16 x 32 x 9 MACs.
    value, side = flops.conv(9, 16, 32, 3, 2)
    assert side == 5
    assert value == 2 * 25 * 16 * 32 * 9


def test_unpadded_conv_and_dense_match_xla():
    # XLA counts 2 FLOPs per multiply-add but skips taps in the zero padding, so compare unpadded layers.
    def conv(x, w):
        return lax.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x, w = jnp.zeros((1, 12, 12, 24)), jnp.zeros((1, 1, 24, 40))
    assert xla_flops(conv, x, w) == flops.conv(12, 24, 40, 1, 2)[0]
    assert xla_flops(jnp.dot, jnp.zeros((1, 48)), jnp.zeros((48, 20))) == flops.dense(48, 20)


@pytest.mark.parametrize("depth, gmacs", [(18, 1.81), (50, 4.09)])
def test_resnet_matches_torchvision_published(depth, gmacs):
    # torchvision's model table lists multiply-adds at 224x224, including the 1000-way fc.
    parts, _ = flops.resnet(depth, 64, 224)
    fc = 512 * (4 if depth == 50 else 1) * 1000
    assert (sum(parts.values()) / 2 + fc) / 1e9 == pytest.approx(gmacs, abs=0.006)


def test_full_size_steps_match_the_issue():
    assert flops.step("fpn", 256, 65536).model / 1e9 == pytest.approx(76.6, abs=0.1)
    assert flops.step("c4", 256, 65536).model / 1e9 == pytest.approx(40.7, abs=0.1)


def test_resnet50_forward_close_to_xla():
    # XLA skips padded taps (-) and counts BatchNorm / ReLU / pooling (+): within a few percent of the count.
    encoder = Encoder(arch="moco", depth=50)
    images, boxes = jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 1, 4))
    shapes = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), images, boxes, train=False))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    measured = xla_flops(lambda v, x, b: encoder.apply(v, x, b, train=False), variables, images, boxes)
    parts, _ = flops.encoder_forward("moco", image=224)
    assert 0.95 < measured / sum(parts.values()) < 1.0
