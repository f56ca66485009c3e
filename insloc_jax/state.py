"""TrainState: everything a run is, so that a checkpoint of it resumes the run exactly.

The data position is not stored: the input pipeline is a pure function of (seed, process index, step).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from insloc_jax import contrast
from insloc_jax.models.encoder import Encoder
from insloc_jax.precision import wide

PyTree = Any


@struct.dataclass
class TrainState:
    """One device's copy of the run (replicated over devices by `parallel.replicate`).

    Attributes:
      step: int32 scalar, steps completed.
      params / batch_stats: the query encoder (trained by SGD) and its BN running statistics.
      key_params / key_batch_stats: the momentum (key) encoder and its own BN running statistics.
      queues: [L, K, D] float32 past keys per level.
      queue_ptr: int32 scalar, next queue row to overwrite (shared by all levels).
      opt_state: optax state (momentum buffers).
      rng: uint32 [2] raw PRNG key of the run; per step it is folded with the step number.
    """

    step: jnp.ndarray
    params: PyTree
    batch_stats: PyTree
    key_params: PyTree
    key_batch_stats: PyTree
    queues: jnp.ndarray
    queue_ptr: jnp.ndarray
    opt_state: PyTree
    rng: jnp.ndarray


def init_variables(encoder: Encoder, rng: jax.Array, image_size: int) -> PyTree:
    """Encoder variables {"params", "batch_stats"} from a dummy batch (one image per ghost group)."""
    batch = max(1, encoder.bn_num_groups)
    images = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    boxes = jnp.tile(jnp.array([[[0.0, 0.0, image_size / 2, image_size / 2]]]), (batch, encoder.num_levels, 1))
    return encoder.init(rng, images, boxes, train=False)


def create_state(
    encoder: Encoder,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_size: int,
    queue_size: int,
) -> TrainState:
    """A fresh run: query encoder initialised, key encoder an exact copy, queues random unit vectors.

    Args:
      encoder: the (query and key) encoder module.
      tx: the optimiser.
      rng: the run's root PRNG key (from `config.seed`).
      image_size: input side used for initialisation (any size works for the conv weights).
      queue_size: K.

    Returns:
      The step-0 TrainState (host-side, unreplicated).
    """
    init_rng, queue_rng, run_rng = jax.random.split(rng, 3)
    variables = init_variables(encoder, init_rng, image_size)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        key_params=jax.tree.map(jnp.copy, params),
        key_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        queues=contrast.init_queues(queue_rng, encoder.num_levels, queue_size, encoder.dim,
                                    wide(encoder.dtype)),
        queue_ptr=jnp.zeros((), jnp.int32),
        opt_state=tx.init(params),
        rng=run_rng,
    )


def initial_state(config, derived=None, abstract: bool = False) -> TrainState:
    """The step-0 TrainState of a run config, exactly as a fresh run creates it.

    Args:
      config: a run config.
      derived: its derived values; None = one device and a one-batch dataset (only the schedule depends on
        them, never a shape).
      abstract: return shapes only (`jax.eval_shape`), e.g. as a restore target.
    """
    from insloc_jax import config as config_lib

    derived = derived or config_lib.derive(config, num_devices=1, num_examples=config.train.global_batch)
    tx, _ = config_lib.make_optimizer(config, derived)
    encoder = config_lib.make_encoder(config, derived)

    def make():
        return create_state(encoder, tx, jax.random.PRNGKey(config.seed), derived.image_size,
                            config.contrast.queue_size)

    # Under jit the initialisation is one compiled program instead of hundreds of eager ops.
    return jax.eval_shape(make) if abstract else jax.jit(make)()


def query_variables(state: TrainState) -> PyTree:
    """The query encoder's variables {"params", "batch_stats"} of a host TrainState."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def load_run_config(workdir: str):
    """The resolved config a run saved in `workdir/config.json`, as an ml_collections ConfigDict."""
    import json
    import os

    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir (no run wrote there)")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def load_state(workdir: str, step=None, config=None):
    """A run's whole saved TrainState (both encoders, queues, optimiser): (host TrainState, config, step).

    Args:
      workdir: a training workdir (holds config.json and checkpoints/).
      step: a checkpoint step; None = the newest readable one.
      config: the run's config; None = the one saved in the workdir.

    Raises:
      FileNotFoundError: no config or no checkpoint in the workdir.
      checkpoint.CheckpointError: the step is missing, unreadable or from another model.
    """
    import os

    from insloc_jax.checkpoint import Checkpointer

    config = config or load_run_config(workdir)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        restored = checkpointer.restore(initial_state(config, abstract=True), step)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first, or check the path")
    state, step = restored
    return state, config, step


def load_query_variables(workdir: str, step=None, config=None):
    """The trained query encoder of a run: ({"params", "batch_stats"}, config, step); see `load_state`."""
    state, config, step = load_state(workdir, step, config)
    return query_variables(state), config, step
