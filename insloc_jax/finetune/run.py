"""`python -m insloc_jax.finetune --config configs/finetune/demo.py --workdir DIR [--config.x=y ...]`:
Mask R-CNN fine-tuned from an export (or from random init) and scored with the COCO evaluator.

A run writes into its workdir: `config.json`, `checkpoints/iter_<N>.pt`, `metrics.jsonl` and TensorBoard
scalars (losses, lr, images/s, evaluations), and at the end `metrics.json` with the 24 COCO numbers plus
`detections_bbox.json` / `detections_segm.json`. The same command restarted on the same workdir resumes
from its newest checkpoint and ends with the weights of an uninterrupted run.
"""
import json
import logging
import os
import sys
import time
from typing import Dict, Tuple

from insloc_jax import workdir_lock
from insloc_jax.finetune import deps

log = logging.getLogger("insloc_jax.finetune")
ARCHS = ("fpn", "c4")
TRANSFERS = ("all", "backbone")
DATA_KINDS = ("embedded", "coco")
COCO_FIELDS = ("train_images", "train_annotations", "val_images", "val_annotations")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def check_config(config) -> None:
    """Raises ConfigError naming the first field that cannot work."""
    choices = {"arch": (config.arch, ARCHS), "transfer": (config.transfer, TRANSFERS),
               "data.kind": (config.data.kind, DATA_KINDS)}
    for field, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"--config.{field} must be one of {allowed}, got {value!r}")
    sched = config.schedule
    for field in ("iterations", "batch", "checkpoint_every", "log_every", "keep"):
        if sched[field] < 1:
            raise ConfigError(f"--config.schedule.{field} must be at least 1, got {sched[field]}")
    if config.data.kind == "coco":
        missing = [f for f in COCO_FIELDS if not config.data[f]]
        if missing:
            raise ConfigError("data.kind=coco needs " + ", ".join(f"--config.data.{f}" for f in missing))
    if config.weights and not os.path.isfile(config.weights):
        raise ConfigError(f"--config.weights={config.weights} does not exist; write one with `python -m "
                          "insloc_jax.export --format torchvision_detection`, or pass '' for random init")


def data_paths(config) -> Dict[str, Tuple[str, str]]:
    """{"train": (image dir, annotations JSON), "val": ...}; generates the embedded set if needed."""
    if config.data.kind == "coco":
        return {split: (config.data[f"{split}_images"], config.data[f"{split}_annotations"])
                for split in ("train", "val")}
    from insloc_jax.data import scenes

    d = config.data
    directory = scenes.prepare(d.data_dir, image_size=d.image_size, num_train=d.num_train, num_val=d.num_val,
                               num_classes=d.num_classes, seed=d.dataset_seed)
    return {split: scenes.split_paths(directory, split) for split in ("train", "val")}


def build(config, num_classes: int):
    """The detector with its initial weights: new layers from `config.seed`, then the export if any."""
    import torch

    from insloc_jax.finetune import models

    torch.manual_seed(config.seed)
    return models.build_detector(config.arch, num_classes + 1, **config.model).to(device(config.device))


def device(setting: str):
    """The torch device of `config.device` ("auto": the first CUDA GPU if torch sees one, else the CPU)."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def load_weights(model, config) -> str:
    """Loads `config.weights` (if any) and says what came from it."""
    if not config.weights:
        return "random init (no --config.weights)"
    from insloc_jax.finetune import weights

    report = weights.load_export(model, config.weights, config.transfer)
    return (f"loaded {report.loaded} tensors from {config.weights} (transfer={config.transfer}), "
            f"{report.initialised} newly initialised")


def finetune(config, workdir: str) -> Dict[str, object]:
    """Runs (or resumes) a fine-tune in `workdir`; returns a summary dict (final metrics included)."""
    deps.require()
    check_config(config)
    import torch

    from insloc_jax.finetune import checkpoints, coco, inference, loop
    from insloc_jax.metrics import MetricWriter

    if config.schedule.threads:
        torch.set_num_threads(config.schedule.threads)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock.hold(workdir):
        splits = {name: coco.load_split(*paths, name=name) for name, paths in data_paths(config).items()}
        model = build(config, coco.num_classes(splits["train"]))
        optimizer = loop.make_optimizer(model, config)
        start = checkpoints.restore(workdir, model, optimizer)
        if start is None:
            start = 0
            log.info("%s", load_weights(model, config))
        else:
            log.info("resuming from iteration %d", start)
        _write_config(config, workdir)
        writer = MetricWriter(workdir, config.schedule.iterations, start, config.schedule.batch, enabled=True,
                              desc="finetune")
        batch = config.schedule.batch

        def evaluate(iteration):
            metrics = inference.evaluate(model, splits["val"], workdir, iteration, batch)
            writer.scalars(iteration, {f"eval/{k}": v for k, v in metrics.items()})
            log.info("iteration %d: %s", iteration, inference.summary(metrics))
            return metrics

        began = time.perf_counter()
        try:
            state = loop.run(model, optimizer, splits["train"], config, workdir, start, writer, evaluate)
            trained = time.perf_counter() - began
            result = {"iteration": state.iteration, "skipped_images": state.skipped_images,
                      "images_per_second": (state.iteration - start) * batch / max(trained, 1e-9)}
            if state.stopped_by:
                return dict(result, stopped_by=state.stopped_by)
            result["metrics"] = evaluate(state.iteration)
            result["evaluate_seconds"] = time.perf_counter() - began - trained
            return result
        finally:
            writer.close()


def _write_config(config, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=1))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a fine-tuning config, e.g. configs/finetune/demo.py",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, detections, config.json")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from absl import flags

    from absl import logging as absl_logging

    # absl routes Python logging through its own handler; plain messages read better beside the bar.
    absl_logging.get_absl_handler().setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        deps.require()  # before the modules below, which import torch
    except deps.MissingDependency as error:
        raise SystemExit(f"error: {error}") from None
    from insloc_jax.finetune import checkpoints, coco, loop, weights

    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    bad_input = (ConfigError, workdir_lock.WorkdirBusy, FileNotFoundError,
                 coco.DataError, weights.ExportMismatch, checkpoints.CheckpointMismatch, loop.NonFiniteLoss)
    try:
        result = finetune(config, workdir)
    except bad_input as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(result))
    return 0


def entry():
    from absl import app

    from insloc_jax.config import parse_flags

    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.exit(entry())
