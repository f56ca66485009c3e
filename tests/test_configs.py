"""Every published config builds its model and one train step at full size, through jax.eval_shape only."""
import functools
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax import parallel  # noqa: E402
from insloc_jax.state import create_state  # noqa: E402
from insloc_jax.step import step_config, train_step  # noqa: E402

IMAGENET_TRAIN = 1281167
DEVICES = 8
PUBLISHED = {
    "insloc_fpn_200ep": ("fpn", 4, 200), "insloc_fpn_400ep": ("fpn", 4, 400),
    "insloc_c4_200ep": ("c4", 1, 200), "insloc_c4_400ep": ("c4", 1, 400),
    "mocov2_200ep": ("moco", 1, 200), "mocov2_800ep": ("moco", 1, 800),
}


def _batch_spec(per_device, size):
    """The pipeline's on-device-augmentation batch for one step, [devices, per_device, ...]."""
    lead = (DEVICES, per_device)
    spec = {}
    for v in (1, 2):
        spec[f"image{v}"] = jax.ShapeDtypeStruct(lead + (size, size, 3), jnp.uint8)
        spec[f"boxes{v}"] = jax.ShapeDtypeStruct(lead + (4,), jnp.float32)
        spec[f"aug{v}_apply"] = jax.ShapeDtypeStruct(lead + (4,), jnp.bool_)
        spec[f"aug{v}_factors"] = jax.ShapeDtypeStruct(lead + (4,), jnp.float32)
        spec[f"aug{v}_order"] = jax.ShapeDtypeStruct(lead + (4,), jnp.int32)
        spec[f"aug{v}_sigma"] = jax.ShapeDtypeStruct(lead, jnp.float32)
    return spec


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_builds_and_steps_at_full_size(name):
    arch, levels, epochs = PUBLISHED[name]
    config = importlib.import_module(f"configs.{name}").get_config()
    derived = config_lib.derive(config, DEVICES, IMAGENET_TRAIN)
    assert config.model.arch == arch and config.model.depth == 50 and config.optim.epochs == epochs
    assert derived.global_batch == 256 and derived.per_device_batch == 32
    assert derived.peak_lr == pytest.approx(0.03) and derived.total_steps == 5004 * epochs
    assert config.data.background_mode == "dataset"  # one random image of the dataset per view
    encoder = config_lib.make_encoder(config, derived)
    assert encoder.bn_num_groups == 1  # 8 devices x 32 images: one BN group of 32 each, as the original
    tx, schedule = config_lib.make_optimizer(config, derived)
    state = jax.eval_shape(functools.partial(create_state, encoder, tx, image_size=derived.image_size,
                                             queue_size=config.contrast.queue_size), jax.random.PRNGKey(0))
    backbone = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params["backbone"]))
    # torchvision's ResNet-50 without fc has 23,508,032 parameters; C4 keeps layer4 in its RoI head.
    assert backbone == (23_508_032 if arch != "c4" else 23_508_032 - 14_964_736)
    assert state.queues.shape == (levels, 65536, 128)
    per_device = functools.partial(train_step, encoder=encoder, tx=tx, schedule=schedule,
                                   anchors=config_lib.anchors(config, derived.image_size),
                                   config=step_config(config))
    replicated = jax.tree.map(lambda x: jax.ShapeDtypeStruct((DEVICES,) + x.shape, x.dtype), state)
    new_state, metrics = jax.eval_shape(jax.pmap(per_device, axis_name=parallel.AXIS), replicated,
                                        _batch_spec(derived.per_device_batch, derived.image_size))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), replicated)
    assert metrics["loss"].shape == (DEVICES,)
    assert {f"loss_{level}" for level in range(levels)} <= set(metrics)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("devices,groups", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_published_configs_normalise_groups_of_32_on_any_device_count(name, devices, groups):
    config = importlib.import_module(f"configs.{name}").get_config()
    derived = config_lib.derive(config, devices, IMAGENET_TRAIN)
    assert derived.per_device_batch == 256 // devices and derived.bn_groups == groups
    assert config_lib.make_encoder(config, derived).bn_num_groups == groups
    assert derived.per_device_batch // groups == 32


def test_bn_group_size_that_does_not_divide_the_device_batch_is_one_clear_error():
    config = importlib.import_module("configs.insloc_fpn_200ep").get_config()
    with pytest.raises(config_lib.ConfigError, match=r"bn_group_size=32 must divide the per-device batch 16"):
        config_lib.derive(config, 16, IMAGENET_TRAIN)
    config.train.ghost_groups = 4
    with pytest.raises(config_lib.ConfigError, match="both set the BatchNorm groups"):
        config_lib.derive(config, 1, IMAGENET_TRAIN)
    config.train.bn_group_size = 0  # the explicit form alone still works
    assert config_lib.derive(config, 1, IMAGENET_TRAIN).bn_groups == 4


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_demo_and_tiny_keep_the_cheaper_settings(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.data.background_mode == "stream" and config.train.bn_group_size == 0
    assert config_lib.derive(config, 8, 4096).bn_groups == 1  # any device count that divides the batch
