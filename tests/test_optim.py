"""Optimiser and schedule against torch.optim.SGD and the cosine formula."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from insloc_jax import optim


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_matches_torch_step_for_step(nesterov):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    target = rng.standard_normal((5, 3)).astype(np.float32)
    lrs = [0.1, 0.08, 0.05, 0.02]
    tx = optim.sgd(lambda step: jnp.asarray(lrs)[step], momentum=0.9, nesterov=nesterov, weight_decay=1e-2)
    params = jnp.asarray(w0)
    state = tx.init(params)
    grad_fn = jax.grad(lambda w: jnp.sum((w - target) ** 2 * jnp.arange(1, 4)))
    tw = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.SGD([tw], lr=lrs[0], momentum=0.9, nesterov=nesterov, weight_decay=1e-2)
    for lr in lrs:
        updates, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        (((tw - torch.tensor(target)) ** 2) * torch.arange(1, 4)).sum().backward()
        opt.step()
        np.testing.assert_allclose(np.asarray(params), tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_cosine_schedule_per_epoch_and_per_step():
    peak, steps_per_epoch, epochs = 0.12, 10, 4
    per_epoch = optim.cosine_schedule(peak, steps_per_epoch * epochs, steps_per_epoch, per_epoch=True)
    per_step = optim.cosine_schedule(peak, steps_per_epoch * epochs, steps_per_epoch, per_epoch=False)
    for step in range(steps_per_epoch * epochs + 1):
        epoch = step // steps_per_epoch
        want = 0.5 * peak * (1 + math.cos(math.pi * min(epoch / epochs, 1.0)))
        assert float(per_epoch(step)) == pytest.approx(want, abs=1e-7)
        assert float(per_step(step)) == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * step / 40)), abs=1e-7)
    assert float(per_epoch(0)) == pytest.approx(peak)
    assert float(per_step(40)) == pytest.approx(0.0, abs=1e-9)


def test_linear_scaling():
    assert optim.scaled_learning_rate(0.03, 256) == pytest.approx(0.03)
    assert optim.scaled_learning_rate(0.03, 1024) == pytest.approx(0.12)


def test_optional_linear_warmup_multiplies_the_cosine():
    peak, total = 0.1, 100
    schedule = optim.cosine_schedule(peak, total, 10, per_epoch=False, warmup_steps=20)
    for step in (0, 5, 19, 20, 60):
        cosine = 0.5 * peak * (1 + math.cos(math.pi * step / total))
        assert float(schedule(step)) == pytest.approx(min(1.0, (step + 1) / 20) * cosine, rel=1e-6)


def test_hold_steps_keep_the_learning_rate_at_zero_first():
    schedule = optim.cosine_schedule(0.1, 100, 10, per_epoch=False, hold_steps=8)
    assert [float(schedule(s)) for s in range(8)] == [0.0] * 8
    assert float(schedule(8)) == pytest.approx(0.05 * (1 + math.cos(math.pi * 8 / 100)), rel=1e-6)


def test_constant_schedule_holds_the_peak_after_hold_and_warmup():
    schedule = optim.cosine_schedule(0.1, 100, 10, per_epoch=False, warmup_steps=10, hold_steps=4,
                                     constant=True)
    assert [float(schedule(s)) for s in range(4)] == [0.0] * 4
    assert float(schedule(4)) == pytest.approx(0.1 * 5 / 10, rel=1e-6)
    for step in (9, 50, 99, 150):
        assert float(schedule(step)) == pytest.approx(0.1, rel=1e-6)


def test_unknown_schedule_is_an_error():
    import ml_collections
    from insloc_jax import config as config_lib

    config = ml_collections.ConfigDict({"optim": {"schedule": "linear"}})
    with pytest.raises(ValueError, match="cosine' or 'constant"):
        config_lib.make_optimizer(config, None)
