"""`python -m insloc_jax.train --config configs/X.py --workdir DIR [--config.a.b=value ...]`: pretraining.

Runs InsLoc (fpn, c4) or the MoCo-v2 baseline on every local device through `jax.pmap` (or `shard_map`),
and across hosts through `jax.distributed`. The workdir receives the resolved config (`config.json`),
Orbax checkpoints (`checkpoints/`), `metrics.jsonl`, TensorBoard events and, from the command, XLA's compiled
programs (`compilation_cache/`, see `use_compilation_cache`). A run always resumes from the
newest readable checkpoint in its workdir (else from `train.resume_from`); SIGTERM / SIGINT save a
checkpoint and exit cleanly, so a preempted job simply restarts with the same command.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import time
from typing import Dict, Iterator, Optional

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np

from insloc_jax import config as config_lib
from insloc_jax import parallel, workdir_lock
from insloc_jax.checkpoint import CheckpointError, Checkpointer
from insloc_jax.metrics import MetricWriter
from insloc_jax.report import Phases
from insloc_jax.state import TrainState, initial_state
from insloc_jax.step import compile_step, step_config, train_step
from insloc_jax.stop_signal import StopFlag

log = logging.getLogger("insloc_jax.train")


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the message names the step range and the last good checkpoint."""


STOP_SYNC_EVERY = 10  # multi-host: steps between agreements on a stop signal (each one waits for the devices)


def _stop_agreed(step: int, signalled: bool) -> bool:
    """Whether every process stops after `step`.

    One process stops as soon as it is signalled. Several processes must save the same step together, but
    SLURM or a preempting scheduler may signal them at different steps (or only one): every
    STOP_SYNC_EVERY steps they exchange their flags and all stop if any was signalled.
    """
    if jax.process_count() == 1:
        return signalled
    if step % STOP_SYNC_EVERY:
        return False
    return bool(np.any(multihost_utils.process_allgather(np.asarray(signalled, np.int32))))


def make_batches(config, derived, source, start_step: int,
                 local_devices: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """This host's batches [local_devices, per_device, ...] from `start_step` on.

    Args:
      source: the opened training source (`open_training_source`).
      local_devices: devices the batches are laid out for (default: this host's).
    """
    from insloc_jax.data.pipeline import make_pipeline

    d = config.data
    return make_pipeline(
        source=source, mode=d.mode, canvas_size=d.canvas_size, fg_size_range=tuple(d.fg_size_range),
        moco_size=d.moco_size, background_mode=d.background_mode, stream_group=d.stream_group,
        per_device_batch=derived.per_device_batch,
        local_devices=local_devices or jax.local_device_count(), process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.seed, start_step=start_step, augment_on=d.augment_on,
        num_workers=d.num_workers,
    )


def open_training_source(config: ml_collections.ConfigDict):
    """The training source (a `data.sources.Source`; the embedded dataset is generated on first use).

    Opened once per run: opening lists a folder or reads a file list, seconds for ImageNet.
    """
    from insloc_jax.data.sources import open_source

    spec = config_lib.source_spec(config)
    if jax.process_count() == 1:
        return open_source(spec)
    # Process 0 prepares the source (the embedded dataset is generated on first use); the others wait for
    # it rather than race it for the same directory, then open it themselves.
    source = open_source(spec) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("insloc_jax: data source ready")
    return source if source is not None else open_source(spec)


def restore_or_create(config, derived, checkpointer: Checkpointer) -> TrainState:
    """The newest readable checkpoint of the workdir, else `train.resume_from`, else a fresh state."""
    # Restoring needs only shapes; the network is initialised only when there is nothing to resume.
    target = initial_state(config, derived, abstract=True)
    restored = checkpointer.restore(target)
    if restored is None and config.train.resume_from:
        other_run = Checkpointer(config.train.resume_from, async_save=False)
        restored = other_run.restore(target, move_unreadable=False)
        if restored is None:
            raise FileNotFoundError(f"train.resume_from={config.train.resume_from} holds no checkpoint")
    if restored is None:
        return initial_state(config, derived)
    log.info("resuming from step %d", restored[1])
    return restored[0]


def _check_finite(scalars: Dict[str, float], first_bad: int, last_good: int, checkpointer: Checkpointer):
    if all(math.isfinite(v) for v in scalars.values()):
        return
    saved = checkpointer.steps()
    raise NonFiniteLoss(
        f"non-finite metrics {scalars} between steps {last_good} and {first_bad}; nothing was saved after "
        f"step {last_good}. The last good checkpoint is step {saved[-1] if saved else 'none'} in "
        f"{checkpointer.directory}: lower optim.base_lr or use model.dtype=float32 and rerun to resume."
    )


def train(config: ml_collections.ConfigDict, workdir: str, stop_at: Optional[int] = None) -> Dict:
    """Trains until `total_steps` (or `stop_at`, or a stop signal), checkpointing along the way.

    Args:
      config: a run config (configs/base.py fields).
      workdir: the run directory (created if needed).
      stop_at: stop after this step as if preempted (tests); None = run to the end.

    Returns:
      {"step": last step, "metrics": the last logged scalars, "stopped_by": None | "signal" | "stop_at"}.

    Raises:
      workdir_lock.WorkdirBusy: another run is using the workdir (nothing is written then).
    """
    os.makedirs(workdir, exist_ok=True)
    # Process 0 locks the workdir (before writing anything) so that a second run on it fails at once.
    with workdir_lock.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train(config, workdir, stop_at)


def _train(config: ml_collections.ConfigDict, workdir: str, stop_at: Optional[int]) -> Dict:
    """`train` with the workdir held."""
    phases = Phases()
    with phases("dataset"):
        source = open_training_source(config)
    with phases("setup"):
        check_export_format(config.train.get("export_format", ""))
        derived = config_lib.derive(config, jax.device_count(), source.num_examples)
        encoder = config_lib.make_encoder(config, derived)
        tx, schedule = config_lib.make_optimizer(config, derived)
        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
        state = restore_or_create(config, derived, checkpointer)
        # Written only once the config has proved usable with the workdir's checkpoints, so a bad config
        # never replaces the record of the run that is there.
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
                f.write(config.to_json_best_effort(indent=2))
        start = int(state.step)
        per_device = functools.partial(
            train_step, encoder=encoder, tx=tx, schedule=schedule,
            anchors=config_lib.anchors(config, derived.image_size), config=step_config(config),
        )
        step_fn = compile_step(per_device, config.train.parallel)
        state = parallel.replicate(state)
        batches = parallel.prefetch_to_device(make_batches(config, derived, source, start), size=2)
        writer = MetricWriter(workdir, derived.total_steps, start, derived.global_batch)
        probe = _periodic_probe(config, workdir)
    result = {"step": start, "metrics": {}, "stopped_by": None}
    try:
        _loop(config, derived, state, step_fn, batches, checkpointer, writer, result, stop_at, probe, phases)
    finally:
        checkpointer.close()  # commits any pending good checkpoint, also when the loop raised
        writer.close()
    if result["stopped_by"] is None and jax.process_index() == 0:
        finish_run(config, workdir, result, phases)
    return result


def finish_run(config, workdir: str, result: Dict, phases: Phases) -> None:
    """What a finished run does last (process 0): `train.export_format`, then `train.report`.

    Adds "export" (the written file) and "report" (the printed text) to `result`.
    """
    outputs = {"checkpoint": os.path.join(workdir, "checkpoints", str(result["step"]))}
    if config.train.export_format:
        with phases("export"):
            result["export"] = export_at_end(config.train.export_format, workdir, result["step"])
        outputs["export"] = result["export"]
    if not config.train.report:
        return
    from insloc_jax import report

    with phases("probe"):
        rows, why_not = _report_probes(config, workdir)
    outputs.update(metrics=os.path.join(workdir, "metrics.jsonl"),
                   tensorboard=f"tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")
    curve = report.loss_curve(workdir)
    if curve:
        outputs["loss curve"] = curve
    result["report"] = report.format_report(phases, rows, why_not or report.verdict(rows), outputs)


def _report_probes(config, workdir: str):
    """(probe rows of `report.compare_with_random`, None) or ([], why the probes were skipped)."""
    from insloc_jax import report
    from insloc_jax.state import load_query_variables

    if config.data.source.kind in ("folder", "file_list"):
        return [], "no verdict: a folder or file-list source has no held-out split to probe"
    variables, _, _ = load_query_variables(workdir, config=config)
    try:
        return report.compare_with_random(config, variables), None
    except FileNotFoundError as error:  # e.g. a tfds set without the eval.test_split split
        return [], f"no verdict: the probes could not read their data ({error})"


def check_export_format(fmt: str) -> None:
    """Raises ConfigError unless `train.export_format` is "" or a format of `insloc_jax.export` (checked
    before training, not after it)."""
    from insloc_jax.export import FORMATS  # here, not in config: export -> state -> config

    if fmt not in ("",) + FORMATS:
        raise config_lib.ConfigError(
            f"train.export_format must be one of {FORMATS} or '' (no export), got {fmt!r}")


def export_at_end(fmt: str, workdir: str, step: int) -> str:
    """Writes `<workdir>/export/step_<step>.<fmt>.{pth,pkl}` (kept if it is already there); returns its path."""
    from insloc_jax import export

    check_export_format(fmt)
    path = os.path.join(workdir, "export", f"step_{step}.{fmt}.{export.FILES[fmt][0]}")
    if os.path.exists(path):
        log.info("%s is already there; kept", path)
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _, _, count = export.export_run(workdir, fmt, path, step=step)
    log.info("wrote %d tensors of step %d to %s (%s)", count, step, path, fmt)
    return path


def _periodic_probe(config, workdir: str):
    """callable(step, host state) running the frozen-feature probes (process 0), or None when off."""
    every = config.get("eval", {}).get("every_steps", 0)
    if not every or jax.process_index() != 0:
        return None
    from insloc_jax.eval.run import make_periodic_evaluator
    from insloc_jax.state import query_variables

    evaluator = make_periodic_evaluator(config, workdir)
    return lambda step, state: evaluator(step, query_variables(state))


def _loop(config, derived, state, step_fn, batches, checkpointer, writer, result, stop_at, probe, phases):
    """The steps: log, NaN-check, checkpoint and probe on schedule; stop on a signal or at `stop_at`.

    `phases` receives "compile" (until the first step is done: it carries the compile) and "train" (the
    other steps).
    """
    last_good = result["step"]
    start, first_done = time.perf_counter(), None
    try:
        with StopFlag() as stop:
            for step in range(result["step"] + 1, derived.total_steps + 1):
                state, metrics = step_fn(state, next(batches))
                if first_done is None:
                    jax.block_until_ready(metrics)
                    first_done = time.perf_counter()
                writer.advance()
                result["step"] = step
                due_log = step % config.train.log_every == 0 or step == derived.total_steps
                due_save = step % config.train.checkpoint_every == 0 or step == derived.total_steps
                signalled = _stop_agreed(step, stop.signal is not None)
                stopping = signalled or step == stop_at
                if due_log or due_save or stopping:
                    scalars = {k: float(v) for k, v in parallel.unreplicate(metrics).items()}
                    _check_finite(scalars, step, last_good, checkpointer)
                    last_good = step
                    result["metrics"] = writer.write(step, scalars) if due_log else scalars
                due_probe = probe is not None and step % config.eval.every_steps == 0
                # One device-to-host copy serves both the checkpoint and the probes.
                host_state = parallel.unreplicate(state) if due_save or stopping or due_probe else None
                if due_save or stopping:
                    if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host_state.params)):
                        _check_finite({"params": math.nan}, step, step - 1, checkpointer)
                    checkpointer.save(step, host_state)
                if due_probe:
                    log.info("step %d probes: %s", step, probe(step, host_state))
                if stopping:
                    result["stopped_by"] = "signal" if signalled else "stop_at"
                    return
    finally:
        if first_done is not None:
            phases.add("compile", first_done - start)
            phases.add("train", time.perf_counter() - first_done)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a run config, e.g. configs/insloc_fpn_200ep.py",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, TensorBoard, config.json")
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
    flags.mark_flags_as_required(["config", "workdir"])
    return flags.FLAGS


def use_compilation_cache(setting: str, workdir: str) -> Optional[str]:
    """Points JAX's persistent compilation cache at `setting` before anything compiles.

    Args:
      setting: `train.compilation_cache`: "auto" (<workdir>/compilation_cache), "" (off) or a directory.
      workdir: the run directory.

    Returns:
      The cache directory, or None when off.
    """
    if not setting:
        return None
    path = os.path.join(workdir, "compilation_cache") if setting == "auto" else os.path.expanduser(setting)
    # Programs that compile in under a second (JAX's default threshold) are not written, so the cache holds
    # the few that matter: the train step, the state initialiser and the probes' feature extractors.
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def main(argv):
    del argv
    flags = sys.modules["absl.flags"].FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax reports every file it writes at INFO
    use_compilation_cache(flags.config.train.compilation_cache, flags.workdir)
    parallel.initialize_distributed(flags.coordinator_address, flags.num_processes, flags.process_id)
    try:
        result = train(flags.config, flags.workdir)
    except (workdir_lock.WorkdirBusy, config_lib.ConfigError, CheckpointError, NonFiniteLoss,
            FileNotFoundError) as error:
        # Bad input, not a bug: one line saying what to do (SourceError, a missing dataset, is a
        # FileNotFoundError whose message says how to prepare it).
        raise SystemExit(f"error: {error}") from None
    if jax.process_index() == 0:
        report = result.pop("report", None)
        print(json.dumps(result))
        if report:
            print(report)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
