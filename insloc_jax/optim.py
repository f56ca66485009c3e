"""The optimiser of REFERENCE section 4: SGD with momentum (optionally Nesterov) and weight decay, a cosine
schedule to zero without warm-up, and the linear learning-rate scaling rule.

torch's SGD adds `weight_decay * param` to the gradient before the momentum buffer; optax's
`add_decayed_weights` followed by `sgd` does the same, and optax's Nesterov form (g + m * buf) matches
torch's, so trajectories agree with the original step for step.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def scaled_learning_rate(base_lr: float, global_batch: int, base_batch: int = 256) -> float:
    """Linear scaling: base_lr * global_batch / base_batch (0.03 at 256 in the paper)."""
    return base_lr * global_batch / base_batch


def cosine_schedule(peak_lr: float, total_steps: int, steps_per_epoch: int, per_epoch: bool = True,
                    warmup_steps: int = 0, hold_steps: int = 0, constant: bool = False):
    """Cosine annealing from `peak_lr` to 0 over the run (no warm-up in the paper's schedule).

    Args:
      peak_lr: the learning rate at step 0.
      total_steps: steps in the whole run.
      steps_per_epoch: steps in one epoch.
      per_epoch: hold the rate constant within an epoch (mmcv's `CosineAnnealing` with `by_epoch=True`, as
        the original), else anneal every step.
      warmup_steps: optional linear ramp over the first steps, multiplying the cosine; 0 = none (the
        published configs).
      hold_steps: optional first steps at learning rate 0 (the step still runs, so the queue fills with
        real keys); 0 = none (the published configs).
      constant: hold `peak_lr` for the whole run instead of annealing (not the paper's schedule; for
        studying learning dynamics, see BENCHMARKS.md).

    Returns:
      An optax schedule: step -> float32 learning rate.
    """
    epochs = max(1, math.ceil(total_steps / steps_per_epoch))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if per_epoch:
            progress = jnp.floor(step / steps_per_epoch) / epochs
        else:
            progress = step / max(total_steps, 1)
        ramp = jnp.minimum(1.0, (step + 1.0) / warmup_steps) if warmup_steps else 1.0
        anneal = 1.0 if constant else 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
        lr = ramp * peak_lr * anneal
        return jnp.where(step < hold_steps, 0.0, lr)

    return schedule


def sgd(schedule, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 1e-4):
    """SGD with weight decay on every parameter (BN scales and biases included, as the original).

    Args:
      schedule: step -> learning rate.
      momentum: momentum factor.
      nesterov: Nesterov momentum (InsLoc) or plain (MoCo-v2).
      weight_decay: L2 coefficient added to the gradient.

    Returns:
      An optax GradientTransformation.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
    )
