"""Array-in / array-out maths of momentum contrast: key-encoder update, InfoNCE, queue FIFO.

Shapes: B per-device batch, L levels (4 for InsLoc-FPN, 1 for C4 and MoCo), D embedding size, K queue
length. Queues are stored [L, K, D] (rows are past keys) so the logits against them are one matmul.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from insloc_jax.precision import wide

PyTree = Any


def momentum_update(key_tree: PyTree, query_tree: PyTree, momentum: float) -> PyTree:
    """key <- m * key + (1 - m) * query, leaf by leaf (parameters only; BN statistics are not averaged).

    Args:
      key_tree: the key encoder's parameters.
      query_tree: the query encoder's parameters, same structure.
      momentum: m, 0.999 in the paper.

    Returns:
      The updated key parameters.
    """
    return jax.tree.map(lambda k, q: momentum * k + (1.0 - momentum) * q, key_tree, query_tree)


def init_queues(rng: jax.Array, levels: int, size: int, dim: int, dtype=jnp.float32) -> jnp.ndarray:
    """Random unit vectors, [levels, size, dim] in `dtype` (the original initialises with normalised noise)."""
    queue = jax.random.normal(rng, (levels, size, dim), dtype)
    return queue / jnp.linalg.norm(queue, axis=-1, keepdims=True)


def infonce_logits(query: jnp.ndarray, key: jnp.ndarray, queue: jnp.ndarray, temperature: float,
                   batch_keys: Optional[jnp.ndarray] = None, own: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Logits of the positive key (column 0), of the queued negatives and optionally of the batch's other keys.

    Args:
      query: [B, L, D] L2-normalised query embeddings.
      key: [B, L, D] L2-normalised key embeddings (treated as constants).
      queue: [L, K, D] past keys.
      temperature: T, 0.2 in the paper.
      batch_keys: [N, L, D] the keys of the whole global batch, or None (the paper: queue negatives only).
        When given, every query also contrasts with the N - 1 keys of the other samples, which come from the
        current key encoder like its positive does.
      own: [B] int, the row of batch_keys that is each query's own key (needed with batch_keys).

    Returns:
      [B, L, 1 + K] float32 logits, or [B, L, 1 + K + N - 1] with batch_keys (the other samples' keys last,
      in batch order).
    """
    query = query.astype(wide(query.dtype))
    key = jax.lax.stop_gradient(key.astype(query.dtype))
    positive = jnp.sum(query * key, axis=-1, keepdims=True)  # [B, L, 1]
    negative = jnp.einsum("bld,lkd->blk", query, jax.lax.stop_gradient(queue))  # [B, L, K]
    parts = [positive, negative]
    if batch_keys is not None:
        n = batch_keys.shape[0]
        everyone = jnp.einsum("bld,nld->bln", query, jax.lax.stop_gradient(batch_keys.astype(query.dtype)))
        slots = jnp.arange(n - 1)[None, :]
        others = slots + (slots >= own[:, None])  # [B, N-1]: every row but its own, in batch order
        parts.append(jnp.take_along_axis(everyone, others[:, None, :], axis=2))  # [B, L, N-1]
    return jnp.concatenate(parts, axis=-1) / temperature


def infonce_loss(logits: jnp.ndarray) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
    """Cross-entropy against index 0, summed over levels and averaged over the batch.

    Args:
      logits: [B, L, 1 + K].

    Returns:
      (loss scalar, metrics) with per-level `loss` [L], `top1` [L] (fraction of rows whose positive has the
      largest logit), `pos_logit` [L] and `neg_logit` [L] (means of the given logits, i.e. cosines / T).
    """
    log_prob = jax.nn.log_softmax(logits, axis=-1)[..., 0]  # [B, L]
    per_level = -jnp.mean(log_prob, axis=0)  # [L]
    metrics = {
        "loss": per_level,
        "top1": jnp.mean((jnp.argmax(logits, axis=-1) == 0).astype(jnp.float32), axis=0),
        "pos_logit": jnp.mean(logits[..., 0], axis=0),
        "neg_logit": jnp.mean(logits[..., 1:], axis=(0, 2)),
    }
    return jnp.sum(per_level), metrics


def enqueue(queue: jnp.ndarray, keys: jnp.ndarray, pointer: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """FIFO: overwrite rows [pointer, pointer + G) of every level's queue with the new keys.

    Args:
      queue: [L, K, D].
      keys: [G, L, D], the keys of the whole global batch; K must be a multiple of G.
      pointer: int32 scalar, the first row to overwrite.

    Returns:
      (new queue [L, K, D], new pointer = (pointer + G) mod K).
    """
    size, batch = queue.shape[1], keys.shape[0]
    if size % batch:
        raise ValueError(f"queue size {size} must be a multiple of the global batch {batch}")
    rows = jnp.swapaxes(keys, 0, 1).astype(queue.dtype)  # [L, G, D]
    zero = jnp.zeros_like(pointer)  # indices of one integer type, also under 64-bit JAX
    queue = jax.lax.dynamic_update_slice(queue, rows, (zero, pointer, zero))
    return queue, (pointer + batch) % size
