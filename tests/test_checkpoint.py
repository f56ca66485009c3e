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
    moved = [name for name in os.listdir(tmp_path) if name.startswith("2.unreadable-")]
    assert len(moved) == 1 and not (tmp_path / "2").exists()
    assert any(moved[0] in r.getMessage() and "nothing was deleted" in r.getMessage() for r in caplog.records)
    # The moved step is no longer in the way: the resumed run saves step 2 again.
    assert ckpt.steps() == [1]
    ckpt.save(2, _state(5))
    ckpt.wait()
    assert ckpt.steps() == [1, 2]
    np.testing.assert_array_equal(ckpt.restore(_state(0))[0]["params"]["w"], [5.0, 5.0, 5.0])
    assert (tmp_path / moved[0]).is_dir()  # the unreadable copy is still there, as it was
    ckpt.close()


def test_another_runs_directory_is_only_read(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(step))
    _corrupt(tmp_path / "2")
    state, step = Checkpointer(str(tmp_path), async_save=False).restore(_state(0), move_unreadable=False)
    assert step == 1 and sorted(os.listdir(tmp_path)) == ["1", "2"]
    ckpt.close()


def test_an_uncommitted_directory_of_a_step_is_moved_aside_before_saving_it(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
    ckpt.save(1, _state(1))
    (tmp_path / "2").mkdir()  # e.g. a copy that lost its metadata
    (tmp_path / "2" / "stray").write_text("kept")
    ckpt.save(2, _state(2))
    assert ckpt.steps() == [1, 2]
    moved = [name for name in os.listdir(tmp_path) if name.startswith("2.unreadable-")]
    assert len(moved) == 1 and (tmp_path / moved[0] / "stray").read_text() == "kept"
    ckpt.close()


def test_when_no_step_reads_nothing_is_moved(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(step))
    for step in ("1", "2"):
        _corrupt(tmp_path / step)
    with pytest.raises(CheckpointError, match="none of the checkpoints \\[1, 2\\].*--config.train.resume_from"):
        ckpt.restore(_state(0))
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    ckpt.close()


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
