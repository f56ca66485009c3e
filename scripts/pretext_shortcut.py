"""Does a run's pretext tell instances apart, or only the key encoder's fresh keys from the queue's stale ones?

    python scripts/pretext_shortcut.py --workdir DIR [--step N] [--num 256]

In the loss every query meets one key from the current key encoder (its positive) and K queued keys from
earlier steps. If the key encoder drifts within the queue's span (a short queue, a fast key encoder), a
direction shared by all of its current outputs marks the positive as the fresh one, and the loss falls
without the instances being told apart. This script loads a checkpoint's query encoder, key encoder and
queues, embeds the probe composites (`insloc_jax.eval.data`: two views of each held-out image on new backgrounds,
view 1 for the query encoder, view 2 for the key encoder, BatchNorm in training mode as in the step) and
prints per level, as cosines:
  positive       q_i . k_i
  fresh negative q_i . k_j, j != i: other instances' keys from the same, current key encoder
  queue negative q_i . queue: the stored keys
  query spread   q_i . q_j, j != i: how alike the query embeddings are (1 = all one direction)
and two top-1 rates: the positive above every queued key (what the training log's top-1 measures), and the
positive above every other fresh key (instance discrimination). A fresh negative well above the queue
negative, with the first rate high and the second near 1 / num, is the shortcut.
"""
import argparse
import os
import sys
from typing import Dict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shortcut_stats(queries: np.ndarray, keys: np.ndarray, queue: np.ndarray) -> Dict[str, float]:
    """The cosines and top-1 rates of one level (see the module docstring).

    Args:
      queries: [N, D] L2-normalised query embeddings of N instances.
      keys: [N, D] L2-normalised key embeddings of the same instances (row i is query i's positive).
      queue: [K, D] queued keys.

    Returns:
      {"positive", "fresh_negative", "queue_negative", "query_spread", "top1_vs_queue", "top1_vs_fresh"}.
    """
    n = len(queries)
    fresh = queries @ keys.T  # [N, N]
    stale = queries @ queue.T  # [N, K]
    own = np.diag(fresh)
    others = ~np.eye(n, dtype=bool)
    spread = queries @ queries.T
    return {
        "positive": float(own.mean()),
        "fresh_negative": float(fresh[others].mean()),
        "queue_negative": float(stale.mean()),
        "query_spread": float(spread[others].mean()),
        "top1_vs_queue": float(np.mean(own > stale.max(axis=1))),
        "top1_vs_fresh": float(np.mean(own > np.where(others, fresh, -np.inf).max(axis=1))),
    }


def embed_views(config, state, data, num: int):
    """(queries [num, L, D] of view 1 by the query encoder, keys [num, L, D] of view 2 by the key encoder)."""
    import jax
    import jax.numpy as jnp

    from insloc_jax import config as config_lib

    encoder = config_lib.make_encoder(config)
    levels = encoder.num_levels

    @jax.jit
    def embed(params, stats, images, boxes):
        out, _ = encoder.apply({"params": params, "batch_stats": stats}, images,
                               jnp.repeat(boxes[:, None], levels, axis=1), train=True, mutable=["batch_stats"])
        return out

    batch = config.train.global_batch  # the step's BatchNorm batch (one device, no ghost groups)
    count = num - num % batch
    if count == 0:
        raise ValueError(f"--num {num} is below one batch of {batch} composites")

    def run(params, stats, view):
        return np.concatenate([
            np.asarray(embed(params, stats, data.composites[view, s:s + batch], data.boxes[view, s:s + batch]))
            for s in range(0, count, batch)])

    return run(state.params, state.batch_stats, 0), run(state.key_params, state.key_batch_stats, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training workdir (config.json, checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--num", type=int, default=256, help="held-out instances to embed (whole batches)")
    args = parser.parse_args()

    from insloc_jax.eval import data as probe_data
    from insloc_jax.checkpoint import CheckpointError
    from insloc_jax.state import load_state

    try:
        state, config, step = load_state(args.workdir, args.step)
    except (FileNotFoundError, CheckpointError) as error:
        raise SystemExit(f"error: {error}") from None
    settings = probe_data.Settings.from_config(config)
    data = probe_data.load_probe_data(config, settings)
    if args.num > data.boxes.shape[1]:
        raise SystemExit(f"error: --num {args.num} exceeds the {data.boxes.shape[1]} held-out instances")
    queries, keys = embed_views(config, state, data, args.num)
    queues = np.asarray(state.queues)  # [L, K, D]
    names = ("positive", "fresh_negative", "queue_negative", "query_spread", "top1_vs_queue", "top1_vs_fresh")
    print(f"step {step}, {len(queries)} held-out instances, queue of {queues.shape[1]}")
    print("| level | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for level in range(queues.shape[0]):
        stats = shortcut_stats(queries[:, level], keys[:, level], queues[level])
        print(f"| {level} | " + " | ".join(f"{stats[k]:.3f}" for k in names) + " |")


if __name__ == "__main__":
    main()
