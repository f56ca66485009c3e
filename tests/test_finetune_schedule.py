"""The fine-tuning schedule and per-iteration seeds, against values worked out from their definitions."""
import numpy as np
import pytest

from insloc_jax.finetune import schedule


@pytest.mark.parametrize("iteration, expected", [
    (0, 0.02 * 0.001),  # warm-up starts at warmup_factor * lr
    (50, 0.02 * (0.001 * 0.5 + 0.5)),  # halfway: the mean of factor and 1
    (100, 0.02),  # warm-up over
    (1499, 0.02),
    (1500, 0.002),  # first step
    (1800, 0.0002),  # second step
    (1999, 0.0002),
])
def test_learning_rate(iteration, expected):
    got = schedule.learning_rate(iteration, 0.02, warmup=100, warmup_factor=0.001, steps=(1500, 1800))
    assert got == pytest.approx(expected, rel=1e-12)


def test_learning_rate_without_warmup_or_steps():
    lrs = [schedule.learning_rate(i, 0.1, warmup=0, warmup_factor=0.5, steps=()) for i in range(5)]
    np.testing.assert_allclose(lrs, 0.1)


def test_iteration_seed_is_a_function_of_seed_and_iteration():
    torch = pytest.importorskip("torch")
    from insloc_jax.finetune import loop

    assert loop.iteration_seed(0, 5) == loop.iteration_seed(0, 5)
    seeds = {loop.iteration_seed(s, i) for s in range(3) for i in range(50)}
    assert len(seeds) == 150  # no two (seed, iteration) pairs share a torch stream
    torch.manual_seed(loop.iteration_seed(1, 7))
    first = torch.rand(3)
    torch.manual_seed(loop.iteration_seed(1, 7))
    assert torch.equal(first, torch.rand(3))


def test_batchnorm_parameters_get_no_weight_decay():
    torch = pytest.importorskip("torch")
    from insloc_jax.finetune import loop

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decayed, plain = loop.parameter_groups(model, 1e-4)
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert {id(p) for p in plain["params"]} == {id(p) for p in model[1].parameters()}
    assert len(decayed["params"]) == 4  # conv and linear weights and biases
