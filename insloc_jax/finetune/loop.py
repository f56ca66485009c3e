"""The fine-tuning loop: SGD over deterministic batches, checkpoints, periodic evaluation, stop signals.

Every random draw of an iteration comes from (seed, iteration): the batch's images and flips
(`coco.batch_indices` / `coco.flip_draws`) and torch's generator, reseeded before the forward pass, which
torchvision's RPN and RoI samplers draw from. A run resumed from the checkpoint of iteration N therefore
trains iteration N + 1 exactly as an uninterrupted run does.
"""
import dataclasses
import logging
import math
import signal
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from insloc_jax.data import seeds
from insloc_jax.stop_signal import StopFlag
from insloc_jax.finetune import checkpoints, coco, schedule

log = logging.getLogger(__name__)
TORCH_SEED = 202  # the purpose of torch's per-iteration seed, beside coco.BATCH and coco.FLIP


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the iteration and the last checkpoint."""


@dataclasses.dataclass
class LoopState:
    """What the loop reports: iterations done, corrupt images skipped, the last logged losses."""

    iteration: int
    skipped_images: int = 0
    losses: Dict[str, float] = dataclasses.field(default_factory=dict)
    stopped_by: Optional[str] = None


def iteration_seed(seed: int, iteration: int) -> int:
    """torch's seed for `iteration`: a function of (seed, iteration) alone."""
    return int(seeds.rng(seed, TORCH_SEED, iteration).integers(2**62))


def parameter_groups(model, weight_decay: float) -> List[dict]:
    """SGD groups: weight decay on convolutions and fcs, none on BatchNorm (detectron2's default)."""
    import torch

    norms, others = [], []
    for module in model.modules():
        is_norm = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (norms if is_norm else others).append(param)
    return [{"params": others, "weight_decay": weight_decay}, {"params": norms, "weight_decay": 0.0}]


def make_optimizer(model, config):
    """SGD with momentum 0.9 over `parameter_groups`; its lr is set every iteration by the loop."""
    import torch

    groups = parameter_groups(model, config.schedule.weight_decay)
    return torch.optim.SGD(groups, lr=config.schedule.lr, momentum=0.9)


def image_tensor(image: np.ndarray, device="cpu"):
    """uint8 [H, W, 3] -> float [3, H, W] in [0, 1] on `device` (torchvision's detection input)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float() / 255.0


def to_tensors(examples: Sequence[coco.Example], device="cpu"):
    """numpy examples -> torchvision's detection inputs: images [3, H, W] in [0, 1] and target dicts."""
    import torch

    images = [image_tensor(example.image, device) for example in examples]
    targets = [{name: torch.from_numpy(value).to(device) for name, value in
                (("boxes", e.boxes), ("labels", e.labels), ("masks", e.masks))} for e in examples]
    return images, targets


def read_batch(split: coco.Split, seed: int, iteration: int, batch: int, flip: bool):
    """The examples of `iteration` (corrupt images left out) and how many were left out."""
    indices = coco.batch_indices(split, batch, seed, iteration)
    flips = coco.flip_draws(batch, seed, iteration) if flip else np.zeros(batch, bool)
    examples = [coco.read_example(split, int(i), bool(f)) for i, f in zip(indices, flips)]
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


def device_of(model):
    """The device the model's parameters live on."""
    return next(model.parameters()).device


def train_step(model, optimizer, examples, lr: float) -> Dict[str, float]:
    """One SGD step on `examples`; returns the losses (their sum as `loss`)."""
    images, targets = to_tensors(examples, device_of(model))
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses = model(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if math.isfinite(float(total.detach())):
        total.backward()
        optimizer.step()
    return {"loss": float(total.detach()), **{name: float(value.detach()) for name, value in losses.items()}}


def run(model, optimizer, split: coco.Split, config, workdir: str, start: int, writer,
        evaluate: Callable[[int], Dict[str, float]]) -> LoopState:
    """Trains from iteration `start` to `config.schedule.iterations`.

    Args:
      model: the torchvision detector (train mode is set here).
      optimizer: from `make_optimizer`, restored if resuming.
      split: the training split.
      config: the fine-tuning config.
      workdir: where checkpoints go.
      start: iterations already done.
      writer: a `metrics.MetricWriter`.
      evaluate: called with the iteration at every `schedule.eval_every` (not at the end: the caller
        evaluates the final weights).

    Returns:
      The loop's state at the end (or at a stop signal, after saving).
    """
    import torch

    sched = config.schedule
    state = LoopState(iteration=start)
    with StopFlag() as stop:
        for iteration in range(start, sched.iterations):
            model.train()
            examples, skipped = read_batch(split, config.seed, iteration, sched.batch, config.data.flip)
            state.skipped_images += skipped
            if not examples:
                raise coco.DataError(f"iteration {iteration}: every image of the batch is unreadable")
            torch.manual_seed(iteration_seed(config.seed, iteration))
            lr = schedule.learning_rate(iteration, sched.lr, sched.warmup, sched.warmup_factor, sched.steps)
            losses = train_step(model, optimizer, examples, lr)
            if not math.isfinite(losses["loss"]):
                last = checkpoints.saved(workdir)
                raise NonFiniteLoss(
                    f"the loss is {losses['loss']} at iteration {iteration + 1}; the weights were not updated, "
                    f"last checkpoint: {last[-1][1] if last else 'none'}; lower --config.schedule.lr")
            state.iteration, state.losses = iteration + 1, losses
            done = state.iteration
            if done % sched.log_every == 0 or done == sched.iterations:
                writer.write(done, dict(losses, lr=lr))
            writer.advance()
            if done % sched.checkpoint_every == 0 or done == sched.iterations or stop.signal:
                checkpoints.save(workdir, done, model, optimizer, sched.keep)
            if stop.signal:
                state.stopped_by = signal.Signals(stop.signal).name
                return state
            if sched.eval_every and done % sched.eval_every == 0 and done != sched.iterations:
                evaluate(done)
    return state
