"""One InsLoc / MoCo-v2 training step in plain torch, with D simulated devices.

The random draws are inputs (the shuffle permutation, the box-augmentation scores and choices), so a test can
give this step the draws of another implementation and compare everything else.

Per step (REFERENCE sections 2-4): query boxes are box-augmented on the chosen levels; the key encoder moves
to m * key + (1 - m) * query (parameters only) before the key pass; the key pass permutes the global batch's
view-2 images with their boxes, runs each device's share with that share's BatchNorm statistics and undoes
the permutation; each device's queries (its own BN statistics) meet their keys and the queues, InfoNCE with
temperature T per level, summed over levels, averaged over samples; the gradient of the mean of the devices'
losses feeds SGD (Nesterov momentum, weight decay on every parameter); the global batch's keys are enqueued
after the loss, one pointer for all levels. BatchNorm running statistics end as the mean of the devices' own.
"""
import contextlib
import copy

import torch
import torch.nn.functional as F

from insloc_torch.boxes import augment_boxes, greedy_nms


def _buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


def _set_buffers(model, values):
    """Replaces (never overwrites in place: autograd keeps the tensors a BN forward saw) every buffer."""
    for module_name, module in model.named_modules():
        for name in list(module._buffers):
            module._buffers[name] = values[f"{module_name}.{name}" if module_name else name].clone()


def per_device(model, forward, chunks, grad):
    """Runs `forward` (model itself, or a compiled wrapper of it) in train mode on each device's (images,
    boxes), each with its own BN statistics; the running statistics end as the mean of what each device's
    pass made of them.

    Returns:
      the list of per-device outputs.
    """
    model.train()
    if len(chunks) == 1:  # one device: its statistics are the run's
        with torch.set_grad_enabled(grad):
            return [forward(*chunks[0])]
    start, ends, outputs = _buffers(model), [], []
    for images, boxes in chunks:
        _set_buffers(model, start)
        with torch.set_grad_enabled(grad):
            outputs.append(forward(images, boxes))
        ends.append(_buffers(model))
    averaged = {}
    for name, value in start.items():
        stacked = torch.stack([e[name] for e in ends])
        averaged[name] = stacked[0] if name.endswith("num_batches_tracked") else stacked.mean(0)
    _set_buffers(model, averaged)
    return outputs


def infonce(query, key, queue, temperature):
    """query, key [B, L, D], queue [L, K, D] -> (loss summed over levels, per-level loss [L], top-1 [L])."""
    positive = (query * key).sum(-1, keepdim=True)  # [B, L, 1]
    negative = torch.einsum("bld,lkd->blk", query, queue)
    logits = torch.cat([positive, negative], -1) / temperature
    target = torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long, device=logits.device)
    per_level = F.cross_entropy(logits.flatten(0, 1), target, reduction="none").view(logits.shape[:2]).mean(0)
    top1 = (logits.argmax(-1) == 0).to(query.dtype).mean(0)
    return per_level.sum(), per_level, top1


class TrainStep:
    """Query and key encoders, SGD and queues of one run; `step(...)` advances them by one step.

    Args:
      query: the query encoder (a models.*Encoder); the key encoder starts as its exact copy.
      queues: [L, K, D] initial queue contents (their dtype is the loss's); pointer starts at 0.
      devices: D, simulated devices (the global batch splits into D equal shares).
      momentum, temperature, augment_levels: the method's settings.
      lr_momentum, nesterov, weight_decay: SGD's.
      autocast: a dtype to run the encoders in under `torch.autocast` (torch.bfloat16), or None.
      compiled: run both encoders' forwards through `torch.compile`.
      keep_grads: keep each step's gradients in `self.grads` (for comparisons).
    """

    def __init__(self, query, queues, devices, momentum, temperature, augment_levels,
                 lr_momentum=0.9, nesterov=True, weight_decay=1e-4, autocast=None, compiled=False,
                 keep_grads=True):
        self.query, self.key = query, copy.deepcopy(query)
        for p in self.key.parameters():
            p.requires_grad_(False)
        self.queues, self.pointer = queues.clone(), 0
        self.devices, self.momentum, self.temperature = devices, momentum, temperature
        self.augment_levels = tuple(augment_levels)
        self.optimizer = torch.optim.SGD(self.query.parameters(), lr=0.0, momentum=lr_momentum,
                                         nesterov=nesterov, weight_decay=weight_decay)
        self.forward = {m: torch.compile(m) if compiled else m for m in (self.query, self.key)}
        self.autocast, self.keep_grads, self.grads = autocast, keep_grads, {}
        self.params = (list(self.key.parameters()), list(self.query.parameters()))

    def _shares(self, *tensors):
        share = tensors[0].shape[0] // self.devices
        return [tuple(t[d * share:(d + 1) * share] for t in tensors) for d in range(self.devices)]

    def _precision(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.queues.device.type, dtype=self.autocast)

    def query_boxes(self, boxes, anchors, scores, draws, nms=greedy_nms):
        """[N, 4] true boxes -> [N, L, 4], box-augmented on `augment_levels` with the given draws [N, A]."""
        out = boxes[:, None, :].repeat(1, self.query.levels, 1).clone()
        if self.augment_levels:
            new = augment_boxes(boxes, anchors, scores, draws, nms=nms)
            for level in self.augment_levels:
                out[:, level] = new
        return out

    def _encode(self, model, images, boxes, grad):
        with self._precision():
            outputs = per_device(model, self.forward[model], self._shares(images, boxes), grad)
        return [o.to(self.queues.dtype) for o in outputs]

    def step(self, images_q, boxes_q, images_k, boxes_k, permutation, lr):
        """One step on the global batch.

        Args:
          images_q, images_k: [N, 3, H, W] the two views; boxes_q: [N, L, 4] query boxes (already
            augmented); boxes_k: [N, 4] key boxes; permutation: [N] the shuffle (device d runs samples
            permutation[d * N / D:(d + 1) * N / D]); lr: this step's learning rate.

        Returns:
          {"loss": mean over devices of the summed loss, "loss_l": [L], "top1": [L]}, detached tensors.
        """
        with torch.no_grad():  # the momentum update comes before the key pass
            torch._foreach_mul_(self.params[0], self.momentum)
            torch._foreach_add_(self.params[0], self.params[1], alpha=1.0 - self.momentum)
        key_boxes = boxes_k[:, None, :].repeat(1, self.query.levels, 1)
        shuffled = torch.cat(self._encode(self.key, images_k[permutation], key_boxes[permutation], grad=False))
        keys = torch.empty_like(shuffled)
        keys[permutation] = shuffled  # back to sample order
        queries = self._encode(self.query, images_q, boxes_q, grad=True)
        results = [infonce(q, k, self.queues, self.temperature) for q, (k,) in zip(queries, self._shares(keys))]
        loss = torch.stack([r[0] for r in results]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.keep_grads:
            self.grads = {name: p.grad.clone() for name, p in self.query.named_parameters()}
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        total = keys.shape[0]
        self.queues[:, self.pointer:self.pointer + total] = keys.detach().transpose(0, 1)
        self.pointer = (self.pointer + total) % self.queues.shape[1]
        return {"loss": loss.detach(), "loss_l": torch.stack([r[1] for r in results]).mean(0).detach(),
                "top1": torch.stack([r[2] for r in results]).mean(0)}
