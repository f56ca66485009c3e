"""The whole train step against the independent PyTorch step of insloc_torch, on 2 simulated devices.

Both start from the same weights (the JAX initialisation through the project's mmdet / torchvision export),
the same queues, batches and random draws (shuffle permutation, box-augmentation scores and choices, derived
here from the step's key as the JAX step derives them), and are compared after steps 1 and 3: per-level
losses and top-1, the gradient of every parameter, the updated parameters and BatchNorm statistics, the key
encoder, the queues and the pointer. In float64 (model.dtype=float64 under 64-bit JAX) everything agrees
to 1e-9 of each tensor's largest entry (measured: 1e-13 and better, the FPN step-3 gradient 5e-12).

float32 tolerance, derived: both sides sum in float32 in different orders (convolutions of up to 3 x 3 x 64
terms, BatchNorm moments over up to 4 x 32 x 32 values), each reduction contributing about 1e-7..1e-6
relative; through ~20 normalised layers forward and back that measures up to 3e-5 on the step-1 gradients.
Everything is compared relative to each tensor's largest entry, with 2e-4; losses with 1e-5 relative.
One exception, measured: InsLoc-FPN's step-3 gradient, 3.7e-2 apart in float32 (5.7e-2 without box
augmentation, so no discrete choice is behind it) while its float64 twin agrees to 5e-12. That gradient is
the most ill-conditioned in the weights: `python scripts/reference_sensitivity.py` (the float64 reference
alone, weights perturbed by 1e-12 relative) amplifies the perturbation 140x into the step-1 gradient and
1,834x into step 3's for FPN, against 249x (C4) and 332x (MoCo) at step 3, and FPN's float32 step-1
differences are already 5x the others'. So FPN's step-3 gradient is held to 1e-1 in float32 (its
parameters, key encoder and queues still to 2e-4; everything to 1e-9 in float64). C4 and MoCo stay within
4e-5 through step 3.
"""
import os
import sys

import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from insloc_jax import parallel  # noqa: E402
from parity import random_batches  # noqa: E402
from reference.from_jax import jax_run, method_config, reference_run, reference_step, torch_names  # noqa: E402

DEVICES = 2
GLOBAL = 8
SIZE = 64
STEPS = 3
COMPARED_STEPS = (1, STEPS)
TOLERANCE = 2e-4
LOSS_TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 1e-9
FPN_LATE_GRADIENT_TOLERANCE = 1e-1


def _config(arch):
    c = method_config(arch, GLOBAL)
    c.optim.base_lr = 3.0  # peak lr 0.094: three steps move every parameter measurably
    c.contrast.momentum = 0.9  # the key encoder moves measurably too
    return c


def _trace(opt_state):
    """The SGD momentum buffer tree inside the optax chain's state."""
    is_trace = lambda s: isinstance(s, optax.TraceState)
    found = [s.trace for s in jax.tree.leaves(opt_state, is_leaf=is_trace) if is_trace(s)]
    assert len(found) == 1
    return found[0]


def _run_jax(config, batches):
    """Host states [step 0..STEPS] and metrics [step 1..STEPS] of the JAX step on DEVICES devices."""
    state, step_fn, schedule, anchors = jax_run(config, DEVICES, num_examples=GLOBAL * 10)
    replicated = parallel.replicate(state, jax.local_devices()[:DEVICES])
    states, metrics = [state], []
    for batch in batches:
        replicated, m = step_fn(replicated, parallel.shard_batch(batch, DEVICES))
        states.append(jax.device_get(parallel.unreplicate(replicated)))
        metrics.append({k: float(v) for k, v in parallel.unreplicate(m).items()})
    return states, metrics, schedule, anchors


def _rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / (np.max(np.abs(ref)) + 1e-30))


def _compare(ours, theirs, what, tolerance=TOLERANCE):
    """Every name of `ours` ({torch name: array}) against the torch tensors `theirs`; returns the worst."""
    worst = 0.0
    assert set(theirs) <= set(ours), f"{what}: {sorted(set(theirs) - set(ours))[:3]} missing"
    for name, value in ours.items():
        if name.endswith("num_batches_tracked") or name not in theirs and "running_" in name:
            continue  # gradients have no BN statistics
        err = _rel(value, theirs[name].detach().numpy())
        assert err < tolerance, f"{what}: {name} differs by {err:.2e} of its largest entry"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("arch", ["fpn", "c4", "moco"])
def test_three_steps_equal_the_pytorch_reference_step(arch, dtype):
    with jax.enable_x64(dtype == "float64"):
        _three_steps(arch, dtype)


def _three_steps(arch, dtype):
    config = _config(arch)
    config.model.dtype = dtype
    wide = dtype == "float64"
    tolerance, loss_tolerance = (FLOAT64_TOLERANCE, FLOAT64_TOLERANCE) if wide else (TOLERANCE, LOSS_TOLERANCE)
    batches = random_batches(STEPS, GLOBAL, SIZE, np.float64 if wide else np.float32)
    states, metrics, schedule, anchors = _run_jax(config, batches)
    first = states[0]
    ref = reference_run(config, first, DEVICES, torch.float64 if wide else torch.float32)
    _compare(torch_names(first.key_params, first.key_batch_stats, arch), ref.key.state_dict(), "key at 0")
    mu, wd = config.optim.momentum, config.optim.weight_decay
    for s, batch in enumerate(batches):
        out = reference_step(ref, batch, first.rng, s, anchors, float(schedule(s)))
        before, after, m = states[s], states[s + 1], metrics[s]
        levels = len(out["loss_l"])
        assert m["loss"] == pytest.approx(out["loss"], rel=loss_tolerance)
        for level in range(levels):
            assert m[f"loss_{level}"] == pytest.approx(out["loss_l"][level], rel=loss_tolerance)
            assert m[f"top1_{level}"] == pytest.approx(out["top1"][level], abs=1e-6)
        if s + 1 not in COMPARED_STEPS:
            continue
        # The SGD buffer is g + wd * p + mu * (previous buffer): the gradient comes back out exactly.
        trace, previous = _trace(after.opt_state), _trace(before.opt_state)
        grads = jax.tree.map(lambda t, t0, p: t - mu * t0 - wd * p, trace, previous, before.params)
        late_fpn = arch == "fpn" and s > 0 and not wide
        _compare(torch_names(grads, after.batch_stats, arch), ref.grads, f"gradient at step {s + 1}",
                 FPN_LATE_GRADIENT_TOLERANCE if late_fpn else tolerance)
        _compare(torch_names(after.params, after.batch_stats, arch), ref.query.state_dict(), f"query at {s + 1}",
                 tolerance)
        _compare(torch_names(after.key_params, after.key_batch_stats, arch), ref.key.state_dict(),
                 f"key at {s + 1}", tolerance)
        assert _rel(after.queues, ref.queues.numpy()) < tolerance
        assert int(after.queue_ptr) == ref.pointer == (s + 1) * GLOBAL % config.contrast.queue_size
