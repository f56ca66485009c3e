"""`python -m insloc_jax.evaluate --workdir DIR [--step N | --random] [--config X.py]`: frozen-feature probes.

Measures what the backbone of the query encoder learned (never the projection head), on held-out images:
  retrieval_top1   two new composites of every held-out image (copy-paste onto other held-out images, the
                   data package's composition, deterministic from eval.seed); the instance's view-1 box
                   feature must find its own view-2 box feature among all N instances (cosine, top-1).
                   Box feature = RoIAlign 7x7 of the true box on res5 (for c4 the res5 of `Encoder.features`,
                   i.e. the RoI head run on the whole res4 map), averaged over the 7x7 cells.
  knn_top1         whole images resized to data.moco_size, global-pooled res5, kNN (k=20, T=0.07,
                   probes.knn_predict) with the train split as the memory bank and the held-out split as
                   queries, scored against the dataset's labels (skipped when the source has none).
  box_iou_before / box_iou_after / box_iou_gain
                   each composite's true box is jittered eval.jitters times (probes.jitter_boxes); a ridge
                   probe maps each jittered box's RoI features to the deltas onto the true box. RoI features:
                   the jittered box enlarged 1.5x about its centre (so true edges outside it are in view),
                   clipped to the canvas, RoIAlign 4x4 on res4 and 2x2 on res5, flattened and concatenated;
                   the spatial grid is kept because offsets are about where things are inside the box. Fit on
                   the first half of the instances (both views, every jitter), scored on the other half.
  box_iou_geometry the same probe fitted on the jittered box's own coordinates (probes.box_geometry): the
                   layout prior alone (true boxes are large on a small canvas, and a jittered box clipped at
                   the canvas edge says where the true edge is). Features show localisation information only
                   where box_iou_after exceeds it.
Results go to `DIR/eval/step_<N>.json` and TensorBoard (`DIR/tensorboard`, tags `eval/<metric>`); --random
evaluates the untrained step-0 state of the config (`create_state`) as step 0.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Dict, Optional

import ml_collections
import numpy as np

from insloc_jax import config as config_lib
from insloc_jax.eval import probes
from insloc_jax.eval.data import ProbeData, Settings, load_probe_data
from insloc_jax.eval.features import batched, make_extractors
from insloc_jax.state import initial_state, load_query_variables, load_run_config, query_variables


def _flat_views(x: np.ndarray) -> np.ndarray:
    """[2, N, ...] (view, instance) -> [2N, ...], view-major."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def score_probes(extractors, variables, data: ProbeData, settings: Settings, box_probe: bool = True):
    """The three probes on prepared data, as summary metrics and as per-item scores.

    Args:
      extractors: `make_extractors(encoder)` of the variables' encoder.
      variables: the query encoder's {"params", "batch_stats"}.
      data: `load_probe_data` output.
      settings: probe settings (batch size, fit fraction).
      box_probe: also fit and score the box-regression probe (False: retrieval and kNN only, the cheap two).

    Returns:
      (metrics, items). metrics: {"retrieval_top1", "retrieval_chance", "knn_top1" (sources with labels),
      "box_iou_before", "box_iou_after", "box_iou_gain", "box_ridge_alpha", "box_iou_geometry",
      "eval_seconds"}: floats. items: the per-item scores the averaged metrics are means of, for paired
      comparisons of two models on the same data (`probes.paired_difference`): "retrieval_top1" [N] 0/1 per
      view-1 query, "knn_top1" [Q] 0/1 per held-out image, "box_iou_before" / "box_iou_after" /
      "box_iou_geometry" [N_s] mean IoU per scored instance (its 2 views x J jitters, so the rows of one
      instance count once).
    """
    start = time.perf_counter()
    composite_fn, whole_fn = extractors
    _, n = data.boxes.shape[:2]
    views = [_flat_views(x) for x in (data.composites, data.boxes, data.jittered)]  # [2N, ...] each
    feats = batched(composite_fn, variables, views, settings.batch_size)
    box = feats["box"].reshape(2, n, -1)
    items = {"retrieval_top1": probes.retrieval_hits(box[0], box[1]).astype(np.float64)}
    if np.all(data.labels >= 0):
        whole = batched(whole_fn, variables, [data.whole], settings.batch_size)
        m = data.num_bank
        items["knn_top1"] = probes.knn_hits(whole[:m], data.labels[:m], whole[m:], data.labels[m:],
                                            int(data.labels.max()) + 1).astype(np.float64)
    alpha = None
    if box_probe:
        box_items, alpha = _box_probe_items(feats["regress"], data, settings)
        items.update(box_items)
    # Every scored instance has the same number of rows, so these equal the means over rows.
    metrics = {name: float(np.mean(scores)) for name, scores in items.items()}
    metrics["retrieval_chance"] = 1.0 / n
    if box_probe:
        metrics["box_iou_gain"] = metrics["box_iou_after"] - metrics["box_iou_before"]
        metrics["box_ridge_alpha"] = alpha
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics, items


def _box_probe_items(regress: np.ndarray, data: ProbeData, settings: Settings):
    """({"box_iou_before", "box_iou_after", "box_iou_geometry"}: [N_s] mean IoU per scored instance, the
    ridge alpha) from the [2N, J, D] jittered-box grid features."""
    n = data.boxes.shape[1]
    # One probe row per (view, instance, jitter), in the features' order; fitted and scored by instance.
    jitters = data.jittered.shape[2]
    instance = np.tile(np.repeat(np.arange(n), jitters), 2)  # [2 * N * J]
    jittered = data.jittered.reshape(-1, 4).astype(np.float64)
    true = np.repeat(data.boxes.reshape(-1, 4), jitters, axis=0).astype(np.float64)
    fit = instance < max(1, int(round(settings.fit_fraction * n)))
    before, after, alpha = probes.box_regression_ious(regress.reshape(len(instance), -1), jittered,
                                                      true, fit=fit, groups=instance)
    # The same probe on the jittered box's coordinates alone: what the layout prior gives without the image.
    _, layout, _ = probes.box_regression_ious(probes.box_geometry(jittered, data.composites.shape[2]),
                                              jittered, true, fit=fit, groups=instance)
    scored = instance[~fit]
    names = ("box_iou_before", "box_iou_after", "box_iou_geometry")
    return {name: probes.group_means(ious, scored) for name, ious in zip(names, (before, after, layout))}, alpha


def evaluate(config: ml_collections.ConfigDict, variables, source: Optional[Dict[str, Any]] = None,
             settings: Optional[Settings] = None):
    """Runs every probe on the query encoder `variables` ({"params", "batch_stats"}) of `config`.

    Args:
      config: the run config the variables belong to.
      variables: the query encoder's {"params", "batch_stats"} (host or device arrays, not replicated).
      source: a source spec overriding config.data.source.
      settings: probe settings (default: `Settings.from_config(config)`).

    Returns:
      (metrics {name: float}, per-item scores {name: array}), see `score_probes`.
    """
    settings = settings or Settings.from_config(config)
    data = load_probe_data(config, settings, source)
    return score_probes(make_extractors(config_lib.make_encoder(config)), variables, data, settings)


def random_variables(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The untrained query encoder a run of `config` starts from (its step-0 state)."""
    return query_variables(initial_state(config))


def write_results(workdir: str, step: int, metrics: Dict[str, float],
                  items: Optional[Dict[str, np.ndarray]] = None) -> str:
    """Writes `workdir/eval/step_<step>.json` and TensorBoard scalars `eval/<name>`; returns the JSON path.

    `items` (per-item scores of `score_probes`), when given, go to `workdir/eval/step_<step>.npz` so that
    later comparisons can pair this step with another on the same held-out items.
    """
    from tensorboardX import SummaryWriter

    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    path = os.path.join(workdir, "eval", f"step_{step}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"step": step, **metrics}, f, indent=2)
    if items is not None:
        np.savez(os.path.join(workdir, "eval", f"step_{step}.npz"), **items)
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    for name, value in metrics.items():
        writer.add_scalar(f"eval/{name}", value, step)
    writer.close()
    return path


def make_periodic_evaluator(config: ml_collections.ConfigDict, workdir: str):
    """A callable(step, host_variables) -> metrics for the training loop; data and jit are prepared once.

    Args:
      config: the run config (probe settings from `config.eval`).
      workdir: where results are written (see `write_results`).

    Returns:
      evaluate_at(step, variables): runs the probes on the query encoder {"params", "batch_stats"},
      writes JSON and TensorBoard scalars, returns the metrics.
    """
    settings = Settings.from_config(config)
    data = load_probe_data(config, settings)
    extractors = make_extractors(config_lib.make_encoder(config))

    def evaluate_at(step: int, variables) -> Dict[str, float]:
        metrics, items = score_probes(extractors, variables, data, settings)
        write_results(workdir, int(step), metrics, items)
        return metrics

    return evaluate_at


def define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "the run's config file (default: WORKDIR/config.json)")
    flags.DEFINE_string("workdir", None, "run directory with checkpoints/ (and config.json)")
    flags.DEFINE_integer("step", None, "checkpoint step to evaluate (default: the newest)")
    flags.DEFINE_bool("random", False, "evaluate the untrained step-0 encoder instead of a checkpoint")
    flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from insloc_jax.checkpoint import CheckpointError

    flags = sys.modules["absl.flags"].FLAGS
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax reports every file it reads at INFO

    try:
        config = flags.config if flags.config is not None else load_run_config(flags.workdir)
        if flags.random:
            variables, step = random_variables(config), 0
        else:
            variables, _, step = load_query_variables(flags.workdir, flags.step, config)
        metrics, items = evaluate(config, variables)
    except (FileNotFoundError, CheckpointError, config_lib.ConfigError) as error:
        # SourceError (a missing dataset) is a FileNotFoundError too; its message says how to prepare it.
        raise SystemExit(f"error: {error}") from None
    path = write_results(flags.workdir, step, metrics, items)
    print(json.dumps({"step": step, "written": path, **metrics}))

