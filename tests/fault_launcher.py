"""`python tests/fault_launcher.py ARGS...` = `python -m insloc_jax.train ARGS...` with one hook for a fault test.

The hook is chosen by $INSLOC_FAULT and announces itself by creating the file $INSLOC_FAULT_MARKER, then
holds the process still so that the test can strike at a known moment:
  * "hang_in_commit": the first checkpoint commit (Orbax's rename of the finished temporary directory)
    blocks forever, so that a kill leaves a half-written `<step>.orbax-checkpoint-tmp-*` behind;
  * "pause_at_step:N": after the metric write of step N (the step done, its successor not started) the
    process waits until the test removes the marker (at most two minutes), so a signal arrives mid-run.
  * "nan_at_step:N": the batch of step N carries NaN colour-jitter factors, so that step's loss is NaN
    (a non-finite loss without another learning rate, hence without another compiled program).
Everything else is the training command, unchanged.
"""
import asyncio
import os
import runpy
import sys
import time

import numpy as np


def _announce() -> None:
    with open(os.environ["INSLOC_FAULT_MARKER"], "w") as f:
        f.write(str(os.getpid()))


def _hang_in_commit() -> None:
    from orbax.checkpoint._src.path import atomicity

    async def finalize(self):
        _announce()
        await asyncio.sleep(3600)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def _pause_at_step(step: int) -> None:
    from insloc_jax import metrics

    write = metrics.MetricWriter.write

    def paused_write(self, at, scalars):
        result = write(self, at, scalars)
        if at == step:
            _announce()
            deadline = time.monotonic() + 120
            while os.path.exists(os.environ["INSLOC_FAULT_MARKER"]) and time.monotonic() < deadline:
                time.sleep(0.05)
        return result

    metrics.MetricWriter.write = paused_write


def _nan_at_step(step: int) -> None:
    # The pipeline module, not the training module: the command runs as a fresh __main__ that looks
    # `make_pipeline` up in its module at each call.
    from insloc_jax.data import pipeline

    make_pipeline = pipeline.make_pipeline

    def poisoned(**kwargs):
        for at, batch in enumerate(make_pipeline(**kwargs), kwargs["start_step"] + 1):
            if at == step:
                batch = dict(batch, aug1_factors=np.full_like(batch["aug1_factors"], np.nan))
            yield batch

    pipeline.make_pipeline = poisoned


def main() -> None:
    fault = os.environ["INSLOC_FAULT"]
    if fault == "hang_in_commit":
        _hang_in_commit()
    elif fault.startswith("pause_at_step:"):
        _pause_at_step(int(fault.split(":")[1]))
    elif fault.startswith("nan_at_step:"):
        _nan_at_step(int(fault.split(":")[1]))
    else:
        raise SystemExit(f"unknown INSLOC_FAULT {fault!r}")
    sys.argv = ["insloc_jax.train", *sys.argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports
    runpy.run_module("insloc_jax.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
