"""Orbax checkpoints of a run: save every N steps (async), keep the last few, restore the newest that reads.

Checkpoints live in `<workdir>/checkpoints/<step>/`. Orbax writes each one to a temporary directory
(`<step>.orbax-checkpoint-tmp-*`) and renames it when complete, so a crash mid-save never leaves a
half-written step that looks finished (the temporary directory is ignored, and the next save of that step
writes a new one), and older steps are only deleted after a newer one has been committed. A committed step
that cannot be read is moved aside to `<step>.unreadable-<UTC time>` (never deleted: it may be someone's
only copy), so that the resumed run can save that step again instead of failing on it forever.
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says what to do."""


class _Unreadable(CheckpointError):
    """A checkpoint step whose files cannot be read (as opposed to one for another model)."""


def abstract_like(tree: PyTree) -> PyTree:
    """Shape/dtype skeleton of a state, used as the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_shapes(tree: PyTree) -> Dict[str, Tuple[int, ...]]:
    """{"params.backbone.conv1.kernel": shape, ...} for every array leaf (dicts and dataclasses alike)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {".".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat}


def describe_mismatch(expected: Dict[str, tuple], stored: Dict[str, tuple], limit: int = 3) -> str:
    """A short human description of how two leaf-shape maps differ ('' if they agree)."""
    problems = [f"missing in checkpoint: {k}" for k in sorted(set(expected) - set(stored))]
    problems += [f"not in this model: {k}" for k in sorted(set(stored) - set(expected))]
    problems += [
        f"{k}: checkpoint {stored[k]} vs model {expected[k]}"
        for k in sorted(set(expected) & set(stored)) if expected[k] != stored[k]
    ]
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


class Checkpointer:
    """Save / restore-latest / keep-N over one checkpoint directory.

    Args:
      directory: where the numbered step directories live.
      keep: how many of the newest checkpoints to keep.
      async_save: write in a background thread while training continues.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        # Naming the handler lets a fresh manager read metadata of steps written by an earlier process.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def steps(self) -> list:
        """Committed checkpoint steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: PyTree) -> None:
        """Starts saving `state` (host or device arrays, not replicated) as `step`; returns immediately.

        A directory of that step already there (one the run did not resume from: a copy that lost its
        metadata, or a step written by another run) is moved aside first: Orbax would refuse to save over it,
        and the run would fail at this step on every restart.
        """
        if self._step_dir_exists(step):
            self.move_aside(step, "was in the way of a new save of that step")
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def _step_dir_exists(self, step: int) -> bool:
        """Whether `<step>/` exists, as process 0 sees it: all processes then agree on moving it aside."""
        exists = os.path.exists(self._step_dir(step))
        if jax.process_count() == 1:
            return exists
        return bool(multihost_utils.broadcast_one_to_all(np.asarray(exists, np.int32)))

    def move_aside(self, step: int, why: str) -> str:
        """Renames `<step>/` to `<step>.unreadable-<UTC time>` (process 0; the others wait) and forgets it.

        Returns:
          The new path (also logged as a warning with `why`).
        """
        prefix = f"{self._step_dir(step)}.unreadable-"
        if jax.process_index() == 0:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            os.rename(self._step_dir(step), prefix + stamp)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"insloc_jax: checkpoint {step} moved aside")
        # The newest of that step's moved-aside copies is the one just made (the stamp sorts by time).
        name = os.path.basename(prefix)
        target = os.path.join(self.directory, max(f for f in os.listdir(self.directory) if f.startswith(name)))
        self._manager.reload()
        log.warning("checkpoint step %d %s; moved it aside to %s (nothing was deleted)", step, why, target)
        return target

    def wait(self) -> None:
        """Blocks until any background save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def restore(self, target: PyTree, step: Optional[int] = None,
                move_unreadable: bool = True) -> Optional[Tuple[PyTree, int]]:
        """Restores a checkpoint shaped like `target`.

        Args:
          target: a state (or its `abstract_like`) with the structure, shapes and dtypes to restore into.
          step: a specific step; None means the newest checkpoint that reads, falling back to older ones
            with a warning when the newest is corrupt.
          move_unreadable: with step None, move the unreadable steps newer than the one restored aside
            (`move_aside`), so that this run can save those steps again.

        Returns:
          (state, step), or None when the directory holds no checkpoint and no step was asked for.

        Raises:
          CheckpointError: the asked-for step is missing or unreadable, the checkpoints do not match the
            target (another config), or none of them reads.
        """
        abstract = abstract_like(target)
        available = self.steps()
        if step is not None:
            if step not in available:
                raise CheckpointError(
                    f"no checkpoint for step {step} in {self.directory} (available: {available or 'none'})"
                )
            return self._restore_one(abstract, step), step
        if not available:
            return None
        unreadable = {}
        for candidate in reversed(available):
            try:
                restored = self._restore_one(abstract, candidate)
            except _Unreadable as error:
                log.warning("checkpoint step %d is unreadable (%s); trying an older one", candidate, error)
                unreadable[candidate] = error
                continue
            # Only once an older step has been read: the run will save the unreadable steps' numbers again,
            # which Orbax refuses while they are there. Another run's directory (train.resume_from) is
            # only read.
            if move_unreadable:
                for bad, error in unreadable.items():
                    self.move_aside(bad, f"is unreadable ({type(error.__cause__).__name__})")
            return restored, candidate
        raise CheckpointError(
            f"none of the checkpoints {available} in {self.directory} could be read; move that directory "
            "aside (nothing was deleted) and start again, or resume from a copy with --config.train.resume_from"
        )

    def _restore_one(self, abstract: PyTree, step: int) -> PyTree:
        """Checks the stored shapes against the target first, so a wrong config is never taken for corruption."""
        try:
            stored = leaf_shapes(self._manager.item_metadata(step).tree)
        except Exception as error:  # Unreadable metadata: a corrupt or partial step.
            raise _Unreadable(f"step {step}: {type(error).__name__}: {error}") from error
        mismatch = describe_mismatch(leaf_shapes(abstract), stored)
        if mismatch:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match this run's model / config "
                f"({mismatch}); use the config it was trained with or a fresh --workdir"
            )
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:  # Corrupt array data surfaces as tensorstore, JSON or OS errors.
            raise _Unreadable(f"step {step}: {type(error).__name__}: {error}") from error
