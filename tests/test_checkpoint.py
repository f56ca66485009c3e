"""Orbax checkpointing: round trip, keep-N, corrupt-latest fallback and clear errors."""
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from insloc_jax.checkpoint import CheckpointError, Checkpointer


def _state(step, width=3):
    return {"params": {"w": jnp.full((width,), float(step))}, "step": jnp.int32(step)}


def _corrupt(step_dir):
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path):
                with open(path, "wb") as f:
                    f.write(b"not a checkpoint")


def test_round_trip_keep_n_and_latest(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2)
    assert ckpt.restore(_state(0)) is None
    for step in (1, 2, 3):
        ckpt.save(step, _state(step))
    ckpt.wait()
    assert ckpt.steps() == [2, 3]
    state, step = ckpt.restore(_state(0))
    assert step == 3
    np.testing.assert_array_equal(state["params"]["w"], [3.0, 3.0, 3.0])
    state, step = ckpt.restore(_state(0), step=2)
    assert int(state["step"]) == 2
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        ckpt.restore(_state(0), step=7)
    ckpt.close()


def test_corrupt_latest_falls_back_to_previous_with_a_warning(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        ckpt.save(step, _state(step))
    ckpt.wait()
    _corrupt(tmp_path / "2")
    with caplog.at_level(logging.WARNING):
        state, step = ckpt.restore(_state(0))
    assert step == 1 and int(state["step"]) == 1
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_dataclass_state_round_trip(tmp_path):
    @struct.dataclass
    class State:
        params: dict
        step: jnp.ndarray

    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, State(params={"w": jnp.arange(4.0)}, step=jnp.int32(1)))
    ckpt.wait()
    state, _ = ckpt.restore(State(params={"w": jnp.zeros(4)}, step=jnp.int32(0)))
    assert isinstance(state, State)
    np.testing.assert_array_equal(state.params["w"], np.arange(4.0))


def test_incompatible_checkpoint_is_a_clear_error_and_is_kept(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(5, _state(5))
    ckpt.wait()
    other = {"params": {"w": jnp.zeros(3), "extra": jnp.zeros(2)}, "step": jnp.int32(0)}
    with pytest.raises(CheckpointError, match="does not match"):
        ckpt.restore(other)
    with pytest.raises(CheckpointError, match=r"params.w: checkpoint \(3,\) vs model \(4,\)"):
        ckpt.restore(_state(0, width=4))
    assert ckpt.steps() == [5]
    state, _ = ckpt.restore(_state(0))
    np.testing.assert_array_equal(state["params"]["w"], [5.0, 5.0, 5.0])
