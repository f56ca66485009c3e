"""Preemption: SIGTERM / SIGINT set a flag that a training loop checks between steps, so it can save a
checkpoint and return instead of dying mid-step (the pretraining and the fine-tuning loops)."""
import signal
from typing import Optional


class StopFlag:
    """While entered, SIGTERM and SIGINT set `signal` (the signal's number) instead of ending the process.

    The previous handlers come back on exit.
    """

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
