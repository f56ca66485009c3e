"""The end-of-run report (`train.report`): what tells a working run from a broken one, printed by the
training command when a run finishes.

  * seconds per phase: dataset (opening the source; the embedded dataset is generated on first use), setup
    (state, restore, input pipeline), compile (the first step, compile included), train (the other steps),
    probe and export;
  * the two cheap frozen-feature probes of `insloc_jax.eval` (instance retrieval and kNN) of the final weights
    next to the run's random initialisation, on the same held-out items, each with its paired difference
    and that difference's standard error, and a one-line verdict: "learned" when a probe gains more than
    `SIGNIFICANT` standard errors and none loses that much, else "did not learn";
  * where the outputs are (checkpoints, export, metrics, TensorBoard, the loss curve `loss.png`).

Before probing, both models' BatchNorm statistics are re-estimated from the same training images, starting
from the initial statistics: the running statistics move during training even at learning rate 0, and that
alone moves the probes. Re-estimated, the comparison is between weights: identical weights score identically.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

SIGNIFICANT = 3.0  # standard errors a probe must gain for the verdict "learned"
PROBED = (("retrieval_top1", "instance retrieval top-1"), ("knn_top1", "kNN top-1"))
CALIBRATION_BATCHES = 16  # BatchNorm re-estimation: the initial statistics keep weight 0.9**16 = 0.19
PHASES = ("dataset", "setup", "compile", "train", "probe", "export")


class Phases:
    """Wall-clock seconds per named phase; `with phases("train"): ...` adds to that phase."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def initial_batch_stats(batch_stats):
    """The statistics a fresh BatchNorm starts from: mean 0, variance 1 (same tree)."""
    def reset(path, x):
        return jnp.ones_like(x) if getattr(path[-1], "key", None) == "var" else jnp.zeros_like(x)
    return jax.tree_util.tree_map_with_path(reset, batch_stats)


def stats_updater(encoder):
    """jitted (params, batch_stats, images [B, S, S, 3]) -> batch_stats after one training-mode forward pass
    of `Encoder.features` (the running statistics move towards the batch's)."""
    from insloc_jax.models.encoder import Encoder

    def update(params, stats, images):
        _, new = encoder.apply({"params": params, "batch_stats": stats}, images, train=True,
                               method=Encoder.features, mutable=["batch_stats"])
        return new["batch_stats"]

    return jax.jit(update)


def recalibrated(update, variables, images: np.ndarray, batch_size: int):
    """The query encoder's variables with BatchNorm statistics re-estimated on `images`.

    Args:
      update: `stats_updater(encoder)`.
      variables: {"params", "batch_stats"}.
      images: float32 [N, S, S, 3] normalised images; up to CALIBRATION_BATCHES batches of `batch_size` are
        used, in order, starting from the initial statistics.

    Returns:
      {"params", "batch_stats"} with the same params.
    """
    stats = initial_batch_stats(variables["batch_stats"])
    size = min(batch_size, len(images))
    for start in range(0, min(len(images) - size, (CALIBRATION_BATCHES - 1) * size) + 1, size):
        stats = update(variables["params"], stats, jnp.asarray(images[start:start + size]))
    return {"params": variables["params"], "batch_stats": jax.device_get(stats)}


def compare_with_random(config, final_variables) -> List[Dict[str, float]]:
    """Retrieval and kNN of the final weights and of the random initialisation, paired on the same items.

    Args:
      config: the run config (probe sizes from `eval.report_num_test` / `eval.report_num_bank`).
      final_variables: the query encoder {"params", "batch_stats"} of the last step.

    Returns:
      One row per probe the source allows: {"name", "label", "random", "final", "gain", "se"}.
    """
    import dataclasses

    from insloc_jax import config as config_lib
    from insloc_jax.eval import features, probes, run as evaluate
    from insloc_jax.eval.data import Settings, load_probe_data

    settings = dataclasses.replace(Settings.from_config(config), num_test=config.eval.report_num_test,
                                   num_bank=config.eval.report_num_bank)
    data = load_probe_data(config, settings)
    encoder = config_lib.make_encoder(config)
    extractors, update = features.make_extractors(encoder), stats_updater(encoder)
    calibration = data.whole[:data.num_bank]  # training-split images, as the model saw them in training
    items = {}
    for name, variables in (("random", evaluate.random_variables(config)), ("final", final_variables)):
        variables = recalibrated(update, variables, calibration, settings.batch_size)
        items[name] = evaluate.score_probes(extractors, variables, data, settings, box_probe=False)[1]
    rows = []
    for name, label in PROBED:
        if name in items["final"]:
            gain, se = probes.paired_difference(items["random"][name], items["final"][name])
            rows.append({"name": name, "label": label, "random": float(np.mean(items["random"][name])),
                         "final": float(np.mean(items["final"][name])), "gain": gain, "se": se})
    return rows


def _z(row) -> float:
    """The gain in standard errors (0 when both models score every item alike)."""
    if row["se"] > 0:
        return row["gain"] / row["se"]
    return 0.0 if row["gain"] == 0 else math.copysign(math.inf, row["gain"])


def verdict(rows: List[Dict[str, float]]) -> str:
    """One line: "learned: ..." or "did not learn: ...", naming the decisive probe and its margin."""
    def margin(row):
        return f"{row['label']} {row['gain']:+.3f} ± {row['se']:.3f} ({_z(row):+.1f} standard errors)"

    if not rows:
        return "no verdict: the source has no held-out split to probe"
    worst, best = min(rows, key=_z), max(rows, key=_z)
    if _z(worst) < -SIGNIFICANT:
        return f"did not learn: {margin(worst)} against random initialisation"
    if _z(best) > SIGNIFICANT:
        return f"learned: {margin(best)} over random initialisation"
    return (f"did not learn: no probe beats random initialisation by {SIGNIFICANT:g} standard errors ("
            + "; ".join(margin(r) for r in rows) + ")")


def loss_curve(workdir: str) -> Optional[str]:
    """Draws loss vs step from `workdir/metrics.jsonl` into `workdir/loss.png`; returns its path.

    A resumed run logs its re-run steps again: the last record of each step is drawn. None when nothing was
    logged.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    last = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                last[record["step"]] = record["loss"]
    if not last:
        return None
    steps = sorted(last)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(steps, [last[s] for s in steps])
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title(os.path.basename(os.path.abspath(workdir)))
    figure.tight_layout()
    out = os.path.join(workdir, "loss.png")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def format_report(phases: Phases, rows: List[Dict[str, float]], verdict_line: str,
                  outputs: Dict[str, str]) -> str:
    """The printed report: phase times, the probe table, the verdict and the outputs."""
    lines = ["", "phase     seconds"]
    lines += [f"{name:<9} {phases.seconds[name]:7.1f}" for name in PHASES if name in phases.seconds]
    lines.append(f"{'total':<9} {sum(phases.seconds.values()):7.1f}")
    if rows:
        lines += ["", f"{'held-out probe':<26} {'random init':>11} {'final':>7} {'gain':>16}"]
        lines += [f"{r['label']:<26} {r['random']:>11.3f} {r['final']:>7.3f} "
                  f"{r['gain']:>+8.3f} ± {r['se']:.3f}" for r in rows]
    lines += ["", verdict_line, ""]
    width = max(len(name) for name in outputs) if outputs else 0
    lines += [f"{name:<{width}}  {path}" for name, path in outputs.items()]
    return "\n".join(lines)
