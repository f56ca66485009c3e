"""The per-device train step of REFERENCE sections 2-4, written once for `jax.pmap` and `jax.shard_map`.

One step, on every device with its shard of B samples:
  1. query boxes: view 1's box on every level, replaced on the augmented levels (FPN: P5) by a random
     anchor around it (`ops.boxes.sample_augmented_box`, one key per global sample index);
  2. key encoder <- m * key + (1 - m) * query (parameters only);
  3. key pass with shuffle BN: view-2 images and boxes are all-gathered, one permutation of the global
     batch (shared by all devices) deals each device a shard, each device runs its shard with its own BN
     statistics, and the keys are all-gathered and un-permuted;
  4. query pass, InfoNCE per level against the (pre-step) queues, loss summed over levels;
  5. gradients averaged over devices, SGD step, the global batch's keys enqueued FIFO;
  6. BN running statistics averaged over devices (so the replicated state stays identical everywhere;
     the original kept each GPU's own and saved rank 0's).

Randomness depends only on (state.rng, step, global sample index), so 1 device with G ghost BN groups
reproduces G devices exactly.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec

from insloc_jax import contrast, parallel
from insloc_jax.data.augment_jax import augment_views  # pure JAX (the data package's only TF-free module)
from insloc_jax.models.encoder import Encoder
from insloc_jax.ops import boxes as box_ops
from insloc_jax.state import TrainState

PyTree = Any
Batch = Dict[str, jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step.

    Attributes:
      momentum: key-encoder momentum m.
      temperature: InfoNCE temperature T.
      augment_levels: levels whose query box is replaced by box augmentation (FPN: (3,) = P5).
      iou_threshold, nms_threshold, fallback_top_k: box augmentation (REFERENCE section 2).
      batch_negatives: also contrast each query with the other samples' keys of the global batch
        (`contrast.infonce_logits`); off in the paper.
    """

    momentum: float = 0.999
    temperature: float = 0.2
    augment_levels: Tuple[int, ...] = (3,)
    iou_threshold: float = 0.5
    nms_threshold: float = 0.7
    fallback_top_k: int = 4000
    batch_negatives: bool = False


def step_config(config) -> StepConfig:
    """The step's static settings from a run config (its `contrast` and `box_aug` sections)."""
    return StepConfig(
        momentum=config.contrast.momentum,
        temperature=config.contrast.temperature,
        augment_levels=tuple(config.box_aug.levels),
        iou_threshold=config.box_aug.iou_threshold,
        nms_threshold=config.box_aug.nms_threshold,
        fallback_top_k=config.box_aug.fallback_top_k,
        batch_negatives=config.contrast.get("batch_negatives", False),
    )


def view(batch: Batch, index: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Images [B, H, W, 3] float and boxes [B, 4] of view 1 or 2, augmenting on device if the batch asks."""
    if f"aug{index}_apply" in batch:
        return augment_views(batch, index)
    return batch[f"image{index}"], batch[f"boxes{index}"].astype(jnp.float32)


def query_boxes(rng: jax.Array, boxes: jnp.ndarray, sample_ids: jnp.ndarray, levels: int,
                anchors: jnp.ndarray, config: StepConfig) -> jnp.ndarray:
    """Per-level query boxes [B, L, 4]: the true box, box-augmented on `config.augment_levels`.

    Args:
      rng: the step's box-augmentation key.
      boxes: [B, 4] true boxes of the query view.
      sample_ids: [B] global sample indices (keys are folded from them, independent of the device layout).
      levels: L.
      anchors: [A, 4] the anchor grid.
      config: step settings.
    """
    per_level = jnp.repeat(boxes[:, None, :], levels, axis=1)  # [B, L, 4]
    if not config.augment_levels:
        return per_level
    sample = functools.partial(
        box_ops.sample_augmented_box, anchors=anchors, iou_threshold=config.iou_threshold,
        nms_threshold=config.nms_threshold, fallback_top_k=config.fallback_top_k,
    )
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(sample_ids)
    augmented = jax.vmap(sample)(keys, boxes)  # [B, 4]
    for level in config.augment_levels:
        per_level = per_level.at[:, level].set(augmented)
    return per_level


def shuffled_key_pass(encoder: Encoder, variables: PyTree, images: jnp.ndarray, boxes: jnp.ndarray,
                      rng: jax.Array) -> Tuple[jnp.ndarray, jnp.ndarray, PyTree]:
    """Key embeddings with shuffle BN.

    Args:
      encoder: the encoder module.
      variables: {"params", "batch_stats"} of the key encoder.
      images: [B, H, W, 3] this device's key images.
      boxes: [B, L, 4] their boxes.
      rng: the permutation key, identical on every device.

    Returns:
      (this device's keys [B, L, D] in its original sample order, the global batch's keys [N, L, D] in
      global order for the queue, the updated key BN statistics).
    """
    batch = images.shape[0]
    start = lax.axis_index(parallel.AXIS) * batch
    all_images = parallel.all_gather_batch(images)  # [N, H, W, 3]
    all_boxes = parallel.all_gather_batch(boxes)  # [N, L, 4]
    permutation = jax.random.permutation(rng, all_images.shape[0])  # [N]
    mine = lax.dynamic_slice_in_dim(permutation, start, batch)  # [B]
    keys, updates = encoder.apply(variables, all_images[mine], all_boxes[mine], train=True,
                                  mutable=["batch_stats"])
    shuffled = parallel.all_gather_batch(lax.stop_gradient(keys))  # [N, L, D]; row j is sample perm[j]
    ordered = jnp.zeros_like(shuffled).at[permutation].set(shuffled)  # [N, L, D]
    return lax.dynamic_slice_in_dim(ordered, start, batch), ordered, updates["batch_stats"]


def train_step(state: TrainState, batch: Batch, *, encoder: Encoder, tx: optax.GradientTransformation,
               schedule: Callable, anchors: jnp.ndarray, config: StepConfig) -> Tuple[TrainState, Dict]:
    """One step on one device (call inside pmap / shard_map over `parallel.AXIS`).

    Args:
      state: this device's TrainState.
      batch: this device's batch: image1/image2 [B, H, W, 3], boxes1/boxes2 [B, 4] (+ augmentation
        parameters when augmenting on device).
      encoder, tx, schedule, anchors, config: the run's static pieces.

    Returns:
      (new state, metrics averaged over devices: loss, per-level loss_l / top1_l, lr, pos/neg logits,
      grad_norm).
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    box_rng, shuffle_rng = jax.random.split(step_rng)
    images_q, boxes_q = view(batch, 1)
    images_k, boxes_k = view(batch, 2)
    batch_size, levels = images_q.shape[0], state.queues.shape[0]
    sample_ids = lax.axis_index(parallel.AXIS) * batch_size + jnp.arange(batch_size)
    q_boxes = query_boxes(box_rng, boxes_q, sample_ids, levels, anchors, config)
    k_boxes = jnp.repeat(boxes_k[:, None, :], levels, axis=1)

    key_params = contrast.momentum_update(state.key_params, state.params, config.momentum)
    key_vars = {"params": key_params, "batch_stats": state.key_batch_stats}
    keys, global_keys, key_stats = shuffled_key_pass(encoder, key_vars, images_k, k_boxes, shuffle_rng)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        queries, updates = encoder.apply(variables, images_q, q_boxes, train=True, mutable=["batch_stats"])
        logits = contrast.infonce_logits(  # [B, L, 1+K] (+ N-1 with batch negatives)
            queries, keys, state.queues, config.temperature,
            batch_keys=global_keys if config.batch_negatives else None, own=sample_ids)
        loss, metrics = contrast.infonce_loss(logits)
        return loss, (updates["batch_stats"], metrics)

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, parallel.AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    queues, queue_ptr = contrast.enqueue(state.queues, global_keys, state.queue_ptr)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=lax.pmean(batch_stats, parallel.AXIS),
        key_params=key_params,
        key_batch_stats=lax.pmean(key_stats, parallel.AXIS),
        queues=queues,
        queue_ptr=queue_ptr,
        opt_state=opt_state,
    )
    flat = _flat_metrics(loss, metrics, schedule(state.step))
    flat["grad_norm"] = optax.global_norm(grads)  # already averaged: the same on every device
    return new_state, lax.pmean(flat, parallel.AXIS)


def _flat_metrics(loss: jnp.ndarray, metrics: Dict[str, jnp.ndarray], lr: jnp.ndarray) -> Dict[str, jnp.ndarray]:
    """{"loss", "lr", "loss_0", "top1_0", "pos_logit_0", "neg_logit_0", ...} scalars for logging."""
    flat = {"loss": loss, "lr": jnp.asarray(lr, jnp.float32)}
    for name, values in metrics.items():
        for level in range(values.shape[0]):
            flat[f"{name}_{level}"] = values[level]
    return flat


def compile_step(per_device: Callable, backend: str = "pmap", devices=None) -> Callable:
    """Maps a per-device step over the local devices.

    Args:
      per_device: (state, batch) -> (state, metrics) for one device.
      backend: "pmap" (default) or "shard_map" (jit of shard_map over a 1-D mesh with the same axis name).
      devices: the local devices (default: all).

    Returns:
      (replicated state [D, ...], batch [D, B, ...]) -> (new state, metrics [D]); the state is donated.
    """
    if backend == "pmap":
        return jax.pmap(per_device, axis_name=parallel.AXIS, devices=devices, donate_argnums=(0,))
    if backend != "shard_map":
        raise ValueError(f"parallel backend must be 'pmap' or 'shard_map', got {backend!r}")

    def squeezed(state, batch):
        state, batch = jax.tree.map(lambda x: x[0], (state, batch))
        return jax.tree.map(lambda x: x[None], per_device(state, batch))

    spec = PartitionSpec(parallel.AXIS)
    mapped = jax.shard_map(squeezed, mesh=parallel.local_mesh(devices), in_specs=spec, out_specs=spec,
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,))
