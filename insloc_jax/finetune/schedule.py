"""The fine-tuning learning rate: linear warm-up, then steps of x0.1 (detectron2's WarmupMultiStepLR)."""
import bisect
from typing import Sequence


def learning_rate(iteration: int, lr: float, warmup: int, warmup_factor: float, steps: Sequence[int],
                  gamma: float = 0.1) -> float:
    """The learning rate of `iteration` (0-based).

    Args:
      iteration: iterations done before this one.
      lr: the peak learning rate.
      warmup: warm-up iterations; the factor rises linearly from `warmup_factor` to 1 over them.
      warmup_factor: the factor at iteration 0.
      steps: iterations from which the rate is multiplied by `gamma` once more each (sorted).
      gamma: the factor of each step.

    Returns:
      The learning rate.
    """
    factor = 1.0
    if iteration < warmup:
        alpha = iteration / warmup
        factor = warmup_factor * (1 - alpha) + alpha
    return lr * factor * gamma ** bisect.bisect_right(sorted(steps), iteration)
