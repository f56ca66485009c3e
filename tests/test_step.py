"""The train step on 8 fake CPU devices: pmap vs shard_map, ghost BN vs devices, momentum, queue, loss."""
import functools
import math
import sys
import os

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from configs import tiny  # noqa: E402
from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax import parallel  # noqa: E402
from insloc_jax.state import create_state  # noqa: E402
from insloc_jax.step import compile_step, step_config, train_step  # noqa: E402
from parity import random_batches  # noqa: E402

DEVICES = 8
GLOBAL = 16


def _config(base_lr=0.3, dim=16):
    # BatchNorm over groups of 2 images, as the published configs' groups of 32: one group per device on 8
    # devices, eight per device on one.
    c = tiny.get_config()
    c.train.bn_group_size = 2
    c.optim.base_lr = base_lr
    c.model.dim = dim
    return c


def _batches(count, seed=0, dtype=np.float32):
    """Random normalised images and valid boxes, [GLOBAL, ...] per batch."""
    return random_batches(count, GLOBAL, 64, dtype=dtype, seed=seed)


def _run(config, devices, backend, batches):
    """Runs the steps; returns (host states after each step, host metrics after each step)."""
    derived = config_lib.derive(config, devices, num_examples=GLOBAL * 10)
    encoder = config_lib.make_encoder(config, derived)
    tx, schedule = config_lib.make_optimizer(config, derived)
    state = create_state(encoder, tx, jax.random.PRNGKey(config.seed), derived.image_size,
                         config.contrast.queue_size)
    per_device = functools.partial(train_step, encoder=encoder, tx=tx, schedule=schedule,
                                   anchors=config_lib.anchors(config, derived.image_size),
                                   config=step_config(config))
    local = jax.local_devices()[:devices]
    step_fn = compile_step(per_device, backend, local)
    replicated = parallel.replicate(state, local)
    states, metrics = [state], []
    for batch in batches:
        replicated, m = step_fn(replicated, parallel.shard_batch(batch, devices))
        states.append(parallel.unreplicate(replicated))
        metrics.append({k: float(v) for k, v in parallel.unreplicate(m).items()})
    return states, metrics


@pytest.fixture(scope="module")
def pmap_run():
    return _run(_config(), DEVICES, "pmap", _batches(5))


def _max_relative_difference(a, b):
    diffs = jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                           / (np.max(np.abs(np.asarray(y, np.float64))) + 1e-12)), a, b)
    return max(jax.tree.leaves(diffs))


def test_pmap_steps_run_and_learn_something(pmap_run):
    states, metrics = pmap_run
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert int(states[-1].step) == 5
    assert set(metrics[0]) >= {"loss", "lr", "loss_3", "top1_0", "pos_logit_2", "neg_logit_1"}
    moved = _max_relative_difference(states[-1].params, states[0].params)
    assert moved > 1e-4, "SGD must change the query parameters"


def test_shard_map_gives_the_same_results_as_pmap(pmap_run):
    states, metrics = _run(_config(), DEVICES, "shard_map", _batches(2))
    assert _max_relative_difference(states[-1], pmap_run[0][2]) < 1e-5
    assert metrics[1]["loss"] == pytest.approx(pmap_run[1][1]["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def float64_runs():
    """{devices: host states after each step}: two steps on 8 devices and on one (eight BN groups of 2
    there: train.bn_group_size), with batch negatives (which also exercise everything the plain step does),
    in float64.

    What these tests compare is the data flow (which samples meet which statistics and keys), so the two
    programs must agree to rounding. In float32 they did on some CPUs (1e-5 of the parameters after one step)
    and not on others (2e-2 on one CI machine), the first step at lr 0.3 (gradient norm ~400) magnifying
    whatever the two compiled programs round differently. In float64 they agree to ~1e-13 (2-core AMD EPYC),
    and one device normalising all 16 samples as one group instead misses by 2.2.
    """
    runs = {}
    with jax.enable_x64(True):
        for devices in (DEVICES, 1):
            config = _config()
            config.model.dtype = "float64"
            config.contrast.batch_negatives = True
            runs[devices] = _run(config, devices, "pmap", _batches(2, dtype=np.float64))
    return runs


def test_one_device_normalises_the_groups_eight_devices_do(float64_runs):
    (devices, metrics), (one, one_metrics) = float64_runs[DEVICES], float64_runs[1]
    for name in ("params", "key_params", "batch_stats", "key_batch_stats", "queues", "opt_state"):
        assert _max_relative_difference(getattr(one[-1], name), getattr(devices[-1], name)) < 1e-9, name
    assert one_metrics[1]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-12)


def test_batch_negatives_on_eight_devices_equal_one_device(float64_runs, pmap_run):
    # Each device must leave out its own samples' rows of the gathered global batch: a local index would
    # make device d contrast its queries with other samples' positives, and the two runs would differ.
    devices, one = float64_runs[DEVICES][0], float64_runs[1][0]
    assert _max_relative_difference(one[1].params, devices[1].params) < 1e-9
    plain = pmap_run[0][1]  # the same first batch without the option (float32: 1e-5 is far below 0.1)
    assert _max_relative_difference(plain.params, devices[1].params) > 0.1  # the option changes the step


def test_momentum_update_of_the_key_encoder(pmap_run):
    states, _ = pmap_run
    m = tiny.get_config().contrast.momentum
    # The key encoder is updated from the query parameters *before* the step's SGD update.
    want = jax.tree.map(lambda k, q: m * k + (1 - m) * q, states[1].key_params, states[1].params)
    assert _max_relative_difference(states[2].key_params, want) < 1e-6
    assert _max_relative_difference(states[1].key_params, states[0].params) < 1e-6  # exact copy at init


def test_queue_fifo_wraps_around(pmap_run):
    states, _ = pmap_run
    size = tiny.get_config().contrast.queue_size  # 64 = 4 steps of 16
    pointers = [int(s.queue_ptr) for s in states]
    assert pointers == [0, 16, 32, 48, 0, 16]
    for step in range(1, 6):
        new, old = np.asarray(states[step].queues), np.asarray(states[step - 1].queues)
        start = ((step - 1) * GLOBAL) % size
        written = slice(start, start + GLOBAL)
        assert not np.allclose(new[:, written], old[:, written])
        untouched = np.ones(size, bool)
        untouched[written] = False
        np.testing.assert_array_equal(new[:, untouched], old[:, untouched])
        np.testing.assert_allclose(np.linalg.norm(new, axis=-1), 1.0, rtol=1e-5)


def test_loss_at_initialisation_is_log_k_plus_one():
    # With lr 0 the encoders stay at initialisation; once the queue holds the model's own keys (4 steps)
    # a random network cannot tell the positive from the negatives, so each level's loss is ~log(K + 1).
    _, metrics = _run(_config(base_lr=0.0, dim=128), DEVICES, "pmap", _batches(6, seed=1))
    k = tiny.get_config().contrast.queue_size
    losses = np.array([[m[f"loss_{level}"] for level in range(4)] for m in metrics[4:]])  # [2, 4]
    assert np.mean(losses) == pytest.approx(math.log(k + 1), abs=0.2)
    np.testing.assert_allclose(losses, math.log(k + 1), atol=0.5)
