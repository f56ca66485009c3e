"""BatchNorm: torch semantics, ghost groups vs per-device BN on 8 fake devices, cross-device statistics.

References: `torch.nn.BatchNorm2d` (train and eval mode) and the same module run per device under
`jax.pmap` over the 8 fake CPU devices of conftest.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from insloc_jax.models.norm import BatchNorm

DEVICES = 8
CHANNELS = 6


def _variables(seed):
    rng = np.random.default_rng(seed)
    return {
        "params": {"scale": rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32),
                   "bias": rng.normal(0, 0.1, CHANNELS).astype(np.float32)},
        "batch_stats": {"mean": rng.normal(0, 0.5, CHANNELS).astype(np.float32),
                        "var": rng.uniform(0.5, 2.0, CHANNELS).astype(np.float32)},
    }


def _inputs(seed, batch):
    rng = np.random.default_rng(seed)
    # Per-sample offsets so that different groups really have different statistics.
    offsets = rng.normal(0, 2.0, (batch, 1, 1, CHANNELS))
    return (rng.normal(size=(batch, 5, 4, CHANNELS)) * 1.5 + 3.0 + offsets).astype(np.float32)


def _torch_bn(variables):
    bn = torch.nn.BatchNorm2d(CHANNELS, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(variables["params"]["scale"]))
        bn.bias.copy_(torch.from_numpy(variables["params"]["bias"]))
        bn.running_mean.copy_(torch.from_numpy(variables["batch_stats"]["mean"]))
        bn.running_var.copy_(torch.from_numpy(variables["batch_stats"]["var"]))
    return bn


def test_train_and_eval_match_torch_batchnorm2d():
    variables, x = _variables(0), _inputs(1, 4)
    y, updated = BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
    bn = _torch_bn(variables).train()
    with torch.no_grad():
        ref = bn(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # torch keeps the unbiased batch variance in running_var, with momentum 0.1.
    np.testing.assert_allclose(updated["batch_stats"]["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated["batch_stats"]["var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)

    y_eval = BatchNorm(use_running_average=True).apply(variables, x)
    bn_eval = _torch_bn(variables).eval()
    with torch.no_grad():
        ref_eval = bn_eval(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-5, atol=1e-5)


def test_ghost_groups_equal_per_device_batchnorm_under_pmap():
    assert jax.local_device_count() == DEVICES
    variables, x = _variables(2), _inputs(3, DEVICES * 3)

    y_ghost, ghost = BatchNorm(use_running_average=False, num_groups=DEVICES).apply(
        variables, x, mutable=["batch_stats"])

    def per_device(v, shard):
        return BatchNorm(use_running_average=False).apply(v, shard, mutable=["batch_stats"])

    replicated = jax.tree_util.tree_map(lambda a: np.stack([a] * DEVICES), variables)
    y_dev, dev = jax.pmap(per_device)(replicated, x.reshape(DEVICES, 3, *x.shape[1:]))

    np.testing.assert_allclose(y_ghost, np.asarray(y_dev).reshape(x.shape), rtol=1e-5, atol=1e-5)
    # Devices end with different running statistics; the ghost module stores their average.
    dev_var = np.asarray(dev["batch_stats"]["var"])
    assert np.ptp(dev_var, axis=0).max() > 1e-2
    for stat in ("mean", "var"):
        np.testing.assert_allclose(ghost["batch_stats"][stat], np.asarray(dev["batch_stats"][stat]).mean(0),
                                   rtol=1e-5, atol=1e-6)
    # ...and differs from plain BatchNorm over the whole batch.
    y_whole = BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])[0]
    assert np.abs(np.asarray(y_whole) - np.asarray(y_ghost)).max() > 1e-2


def test_axis_name_equals_batchnorm_over_the_global_batch():
    variables, x = _variables(4), _inputs(5, DEVICES * 2)
    y_global, whole = BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])

    def synced(v, shard):
        return BatchNorm(use_running_average=False, axis_name="d").apply(v, shard, mutable=["batch_stats"])

    replicated = jax.tree_util.tree_map(lambda a: np.stack([a] * DEVICES), variables)
    y_dev, dev = jax.pmap(synced, axis_name="d")(replicated, x.reshape(DEVICES, 2, *x.shape[1:]))
    np.testing.assert_allclose(np.asarray(y_dev).reshape(x.shape), y_global, rtol=1e-5, atol=1e-5)
    for stat in ("mean", "var"):  # unbiased with the global count, identical on every device
        np.testing.assert_allclose(np.asarray(dev["batch_stats"][stat]),
                                   np.stack([whole["batch_stats"][stat]] * DEVICES), rtol=1e-5, atol=1e-6)


def test_axis_name_with_groups_pools_group_g_of_every_device():
    variables, x = _variables(6), _inputs(7, DEVICES * 4)
    shards = x.reshape(DEVICES, 2, 2, *x.shape[1:])  # [device, group, sample, ...]

    def synced(v, shard):
        return BatchNorm(use_running_average=False, axis_name="d", num_groups=2).apply(v, shard,
                                                                                        mutable=["batch_stats"])

    replicated = jax.tree_util.tree_map(lambda a: np.stack([a] * DEVICES), variables)
    y_dev, _ = jax.pmap(synced, axis_name="d")(replicated, shards.reshape(DEVICES, 4, *x.shape[1:]))
    # Single-device equivalent: group g gathers group g of all devices.
    regrouped = shards.transpose(1, 0, 2, 3, 4, 5).reshape(x.shape)
    y_ref = BatchNorm(use_running_average=False, num_groups=2).apply(variables, regrouped,
                                                                     mutable=["batch_stats"])[0]
    y_ref = np.asarray(y_ref).reshape(2, DEVICES, 2, *x.shape[1:]).transpose(1, 0, 2, 3, 4, 5)
    np.testing.assert_allclose(np.asarray(y_dev), y_ref.reshape(DEVICES, 4, *x.shape[1:]), rtol=1e-5, atol=1e-5)


def test_bfloat16_output_with_float32_statistics():
    variables, x = _variables(8), _inputs(9, 4)
    y16, st16 = BatchNorm(use_running_average=False, dtype=jnp.bfloat16).apply(
        variables, jnp.asarray(x, jnp.bfloat16), mutable=["batch_stats"])
    y32, _ = BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
    assert y16.dtype == jnp.bfloat16 and st16["batch_stats"]["var"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=5e-2)


def test_batch_not_divisible_into_groups_is_an_error():
    with pytest.raises(ValueError, match="ghost groups"):
        BatchNorm(use_running_average=False, num_groups=3).init(jax.random.PRNGKey(0), jnp.ones((4, 2, 2, 3)))
