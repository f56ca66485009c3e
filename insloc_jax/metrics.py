"""Where a run's numbers go: a progress bar, TensorBoard scalars and a JSON-lines file in the workdir.

Only process 0 writes; other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Optional

import jax


class MetricWriter:
    """Progress bar (step, samples/s, ETA, loss), `metrics.jsonl` and TensorBoard events in `workdir`.

    Args:
      workdir: the run directory.
      total_steps: steps of the whole run (for the bar and the ETA).
      start_step: the step the run (re)starts from.
      samples_per_step: global batch, for samples/s.
      enabled: write anything at all (False on processes other than 0).
      desc: the progress bar's label.
    """

    def __init__(self, workdir: str, total_steps: int, start_step: int, samples_per_step: int,
                 enabled: Optional[bool] = None, desc: str = "pretrain"):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.samples_per_step = samples_per_step
        self._last_time, self._last_step = time.perf_counter(), start_step
        self._bar = self._jsonl = self._tb = None
        if not self.enabled:
            return
        from tqdm import tqdm  # only the writing process needs these
        from tensorboardX import SummaryWriter

        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         desc=desc)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def advance(self, steps: int = 1) -> None:
        """Moves the bar after steps that were not logged."""
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, step: int, scalars: Dict[str, float]) -> Dict[str, float]:
        """Logs scalars at `step` (steps done), adding samples_per_second since the previous call.

        Returns:
          The scalars written, throughput included.
        """
        now = time.perf_counter()
        elapsed, steps = now - self._last_time, step - self._last_step
        scalars = dict(scalars)
        if steps > 0 and elapsed > 0:
            scalars["samples_per_second"] = steps * self.samples_per_step / elapsed
        self._last_time, self._last_step = now, step
        if not self.enabled:
            return scalars
        self._bar.set_postfix(loss=f"{scalars.get('loss', math.nan):.4f}",
                              samples_s=f"{scalars.get('samples_per_second', 0.0):.0f}", refresh=False)
        self.scalars(step, scalars)
        return scalars

    def scalars(self, step: int, scalars: Dict[str, float]) -> None:
        """Logs scalars at `step` to `metrics.jsonl` and TensorBoard, without touching the bar or the
        throughput (evaluation results)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._jsonl.close()
            self._tb.close()
