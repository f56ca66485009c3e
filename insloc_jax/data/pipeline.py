"""The input pipeline a run uses: per-host batches of view pairs, deterministic and resumable (Grain).

`make_pipeline(...)` returns an iterator of numpy batches (host memory; moving them to the devices, e.g.
with `jax.device_put_sharded` two batches ahead, is the training loop's job). Every array has leading dims
[local_devices, per_device] = [L, B]:

  image1, image2   uint8   [L, B, S, S, 3]  the two views before pixel augmentation (augment_on="device",
                                            the default), or
                   float32 [L, B, S, S, 3]  augmented and normalised views (augment_on="host")
  boxes1, boxes2   float32 [L, B, 4]        each view's instance box, xyxy in view pixels (for "device":
                                            before the flip, which augment_jax applies with the pixels)
  index            int64   [L, B]           dataset index of the foreground image
  position         int64   [L, B]           global sample position (order.py; one process: step * L * B + k)
  aug{v}_apply     bool    [L, B, 4]        augment_on="device" only, per view v in {1, 2}: the
  aug{v}_factors   float32 [L, B, 4]        parameters that `augment_jax.augment_views(batch, v)`
  aug{v}_order     int32   [L, B, 4]        applies inside the jitted step (see augment.sample_params)
  aug{v}_sigma     float32 [L, B]

Why "device" is the default: on the host, pixel augmentation costs more than decoding and composition
together (scripts/benchmark_input.py), while on the accelerator it is a few fused elementwise kernels next
to a ResNet-50 step. Leaving it to the jitted step also sends uint8 instead of float32 (4x less transfer).

S is canvas_size (mode "insloc") or moco_size (mode "moco"). Grain makes chunks of consecutive positions
(views.Chunks) in `num_workers` worker processes, in order; this iterator cuts them into batches. Every
random choice is a stateless function of (seed, global position), so the batches from start_step=s equal
batches s, s+1, ... of a run started at 0, and the global batch of a step does not depend on how many
processes make it.
"""
import collections.abc
import logging
import os
from typing import Optional, Sequence

import grain
import numpy as np
from absl import flags

from insloc_jax.data import views
from insloc_jax.data.sources import Source, open_source

MODES, BACKGROUND_MODES = views.MODES, views.BACKGROUND_MODES
MAX_WORKERS = 16


def make_pipeline(*, source, mode: str = "insloc", canvas_size: int = 256,
                  fg_size_range: Sequence[int] = (128, 255), moco_size: int = 224,
                  background_mode: str = "stream", stream_group: int = 16, per_device_batch: int,
                  local_devices: int, process_index: int = 0, process_count: int = 1, seed: int = 0,
                  start_step: int = 0, augment_on: str = "device", num_workers: int = 0,
                  prefetch: int = 2) -> "Batches":
    """Builds the batch iterator (see the module docstring for the batch layout).

    Args:
      source: a source spec for `sources.open_source`, e.g. {"kind": "synthetic", "data_dir": "/tmp/d"},
        or a Source it opened.
      mode: "insloc" (copy-paste composites) or "moco" (two RandomResizedCrop views of the whole image).
      canvas_size: side of the InsLoc canvas.
      fg_size_range: (low, high) of the pasted foreground's target size, integers in [low, high).
      moco_size: side of the MoCo views.
      background_mode: "stream" or "dataset" (see views.py).
      stream_group: group size of the stream background mode (>= 2).
      per_device_batch: samples per device.
      local_devices: devices on this host.
      process_index, process_count: this host's index and the number of hosts.
      seed: run seed.
      start_step: first step to produce (resume).
      augment_on: "device" (uint8 views plus augmentation parameters; the step calls
        augment_jax.augment_views) or "host" (the workers apply the pixel augmentation).
      num_workers: worker processes making samples; 0 = in this process (threads), -1 = one per core.
      prefetch: batches prepared ahead.

    Returns:
      A Batches iterator of dict[str, np.ndarray].
    """
    batch = per_device_batch * local_devices
    _check(mode, background_mode, augment_on, stream_group, canvas_size, fg_size_range, batch, process_count)
    src = source if isinstance(source, Source) else open_source(source)
    size = stream_group if mode == "insloc" and background_mode == "stream" else views.CHUNK
    chunks = views.Chunks(src, seed, size, batch, process_index, process_count, mode, canvas_size,
                          tuple(int(v) for v in fg_size_range), moco_size, background_mode, augment_on)
    start = start_step * batch
    first = start // size
    ahead = max(1, prefetch * -(-batch // size))  # chunks in flight: `prefetch` batches
    ds = grain.MapDataset.range(first, first + 2**40).map(chunks)
    workers = resolve_workers(num_workers)
    if workers:
        if not flags.FLAGS.is_parsed():
            # Grain's workers read its absl flags; outside an absl app (scripts, tests) take their defaults.
            flags.FLAGS.mark_as_parsed()
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=-(-ahead // workers)))
    else:
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(ahead, os.cpu_count() or 1),
                                                  prefetch_buffer_size=ahead))
    return Batches(iter(ds), src.name, src.num_examples // (batch * process_count), start - first * size,
                   local_devices, per_device_batch)


def resolve_workers(num_workers: int) -> int:
    """Worker processes for a `num_workers` setting (-1 = one per core, at most MAX_WORKERS)."""
    if num_workers < -1:
        raise ValueError(f"num_workers must be -1 (one per core), 0 (in this process) or positive, got "
                         f"{num_workers}")
    return min(os.cpu_count() or 1, MAX_WORKERS) if num_workers == -1 else num_workers


def _check(mode, background_mode, augment_on, stream_group, canvas_size, fg_size_range, batch,
           process_count):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if background_mode not in BACKGROUND_MODES:
        raise ValueError(f"background_mode must be one of {BACKGROUND_MODES}, got {background_mode!r}")
    if augment_on not in ("host", "device"):
        raise ValueError(f"augment_on must be 'host' or 'device', got {augment_on!r}")
    if stream_group < 2:
        raise ValueError(f"stream_group must be >= 2, got {stream_group}")
    if not 1 <= fg_size_range[0] < fg_size_range[1] <= canvas_size + 1:
        raise ValueError(f"fg_size_range {fg_size_range} must satisfy 1 <= low < high <= canvas_size + 1")
    if mode == "insloc" and background_mode == "stream" and process_count > 1 and batch % stream_group:
        # Groups must hold the same positions as in a one-process run (order.global_position).
        raise ValueError(f"stream backgrounds on {process_count} processes need the per-host batch ({batch}) "
                         f"to be a multiple of data.stream_group ({stream_group})")


class Batches(collections.abc.Iterator):
    """Iterator of numpy batches, cut from the stream of chunks.

    Attributes:
      source_name: the opened source's description.
      steps_per_epoch: full global batches per epoch (num_examples // global batch).
      skipped: undecodable images replaced so far (also logged as a warning when it grows).
    """

    def __init__(self, chunks, source_name: str, steps_per_epoch: int, offset: int, local_devices: int,
                 per_device: int):
        self.source_name = source_name
        self.steps_per_epoch = steps_per_epoch
        self.skipped = 0
        self._chunks = chunks
        self._shape = (local_devices, per_device)
        self._pending, self._offset = [], offset  # chunks not yet used up; samples of the first already used

    def __next__(self) -> dict:
        need = self._shape[0] * self._shape[1]
        parts, have = [], 0
        while have < need:
            if not self._pending:
                self._pending.append(next(self._chunks))
            chunk = self._pending[0]
            take = min(need - have, len(chunk["index"]) - self._offset)
            parts.append({k: v[self._offset:self._offset + take] for k, v in chunk.items()})
            have, self._offset = have + take, self._offset + take
            if self._offset == len(chunk["index"]):
                self._pending.pop(0)
                self._offset = 0
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        newly = int(batch.pop("skipped").sum())
        if newly:
            self.skipped += newly
            logging.warning("input pipeline: replaced %d undecodable image(s) in %s (total %d)", newly,
                            self.source_name, self.skipped)
        return _layout(batch, self._shape)


def _layout(batch, shape):
    """Splits the two views and reshapes every leading dim [L * B] to [L, B]."""
    out = {}
    for key, value in batch.items():
        if key in ("images", "boxes") or key.startswith("aug_"):
            for view in range(2):
                out[_view_key(key, view)] = value[:, view]
        else:
            out[key] = value
    return {k: np.ascontiguousarray(v.reshape(shape + v.shape[1:])) for k, v in out.items()}


def _view_key(name, view):
    if name.startswith("aug_"):
        return f"aug{view + 1}_{name[4:]}"
    return {"images": "image", "boxes": "boxes"}[name] + str(view + 1)
