"""The input pipeline a run uses: per-host batches of view pairs, deterministic and resumable.

`make_pipeline(...)` returns an iterator of numpy batches (host memory; moving them to the devices, e.g.
with `jax.device_put_sharded` two batches ahead, is the training loop's job). Every array has leading dims
[local_devices, per_device] = [L, B]:

  image1, image2   uint8   [L, B, S, S, 3]  the two views before pixel augmentation (augment_on="device",
                                            the default), or
                   float32 [L, B, S, S, 3]  augmented and normalised views (augment_on="host")
  boxes1, boxes2   float32 [L, B, 4]        each view's instance box, xyxy in view pixels (for "device":
                                            before the flip, which augment_jax applies with the pixels)
  index            int64   [L, B]           dataset index of the foreground image
  position         int64   [L, B]           sample position on this host (step * L * B + k)
  aug{v}_apply     bool    [L, B, 4]        augment_on="device" only, per view v in {1, 2}: the
  aug{v}_factors   float32 [L, B, 4]        parameters that `augment_jax.augment_views(batch, v)`
  aug{v}_order     int32   [L, B, 4]        applies inside the jitted step (see augment.sample_params)
  aug{v}_sigma     float32 [L, B]

Why "device" is the default: on the host, pixel augmentation costs about twice decoding and composition
together (scripts/benchmark_input.py), while on the accelerator it is a few fused elementwise kernels next
to a ResNet-50 step. Leaving it to the jitted step also sends uint8 instead of float32 (4x less transfer).

S is canvas_size (mode "insloc") or moco_size (mode "moco"). Batch s holds positions
s * L * B .. (s + 1) * L * B - 1; every random choice is a stateless function of (seed, process index,
position), so the batches from start_step=s equal batches s, s+1, ... of a run started at 0.
"""
import collections.abc
import logging
from typing import Optional, Sequence

import tensorflow as tf

from insloc_jax.data import order, seeds, views
from insloc_jax.data.sources import Source, open_source

MODES = ("insloc", "moco")
BACKGROUND_MODES = ("stream", "dataset")


def make_pipeline(*, source, mode: str = "insloc", canvas_size: int = 256,
                  fg_size_range: Sequence[int] = (128, 255), moco_size: int = 224,
                  background_mode: str = "stream", stream_group: int = 16, per_device_batch: int,
                  local_devices: int, process_index: int = 0, process_count: int = 1, seed: int = 0,
                  start_step: int = 0, augment_on: str = "device", shuffle_buffer: int = 10_000,
                  fallbacks: int = 4, num_threads: Optional[int] = None,
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
        augment_jax.augment_views) or "host" (tf.data applies the pixel augmentation).
      shuffle_buffer: shuffle buffer of streamed (large tfds) sources.
      fallbacks: replacement tries for an undecodable image (indexable sources).
      num_threads: tf.data thread pool size (None = all cores).
      prefetch: batches tf.data prepares ahead.

    Returns:
      A Batches iterator of dict[str, np.ndarray].
    """
    _check(mode, background_mode, augment_on, stream_group, canvas_size, fg_size_range)
    src = source if isinstance(source, Source) else open_source(source)
    batch = per_device_batch * local_devices
    root = seeds.root(seed, process_index)
    start = start_step * batch
    # Stream groups are aligned to multiples of stream_group so a resumed run regroups identically.
    group_start = start - start % stream_group if mode == "insloc" and background_mode == "stream" else start
    ds = order.samples(src, start=group_start, seed=seed, process_index=process_index,
                       process_count=process_count, shuffle_buffer=shuffle_buffer, fallbacks=fallbacks,
                       backgrounds=2 if (mode == "insloc" and background_mode == "dataset") else 0)
    ds = _views(ds, root, mode, canvas_size, fg_size_range, moco_size, background_mode, stream_group)
    ds = ds.skip(start - group_start)
    ds = ds.map(lambda s: views.augment_params(s, root), num_parallel_calls=tf.data.AUTOTUNE)
    if augment_on == "host":
        ds = ds.map(views.augment_on_host, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.map(lambda b: _layout(b, local_devices, per_device_batch), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(prefetch).with_options(_options(num_threads))
    return Batches(ds, src.name, src.num_examples // process_count // batch, start)


def _check(mode, background_mode, augment_on, stream_group, canvas_size, fg_size_range):
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


def _views(ds, root, mode, canvas_size, fg_size_range, moco_size, background_mode, stream_group):
    """Per-sample views (uint8 "images" [2, S, S, 3] and "boxes" [2, 4]) in position order."""
    parallel = tf.data.AUTOTUNE
    if mode == "moco":
        return ds.map(lambda s: views.moco_views(s, root, moco_size), num_parallel_calls=parallel)
    ds = ds.map(lambda s: views.foreground_layers(s, root, canvas_size, fg_size_range),
                num_parallel_calls=parallel)
    if background_mode == "dataset":
        return ds.map(lambda s: views.compose_from_dataset(s, canvas_size), num_parallel_calls=parallel)
    ds = ds.map(lambda s: views.stream_background(s, root, canvas_size, stream_group),
                num_parallel_calls=parallel)
    ds = ds.batch(stream_group, drop_remainder=True)
    ds = ds.map(views.compose_group, num_parallel_calls=parallel)
    return ds.unbatch()


def _layout(batch, local_devices, per_device):
    """Splits the two views and reshapes every leading dim [L * B] to [L, B]."""
    out = {}
    for key, value in batch.items():
        if key in ("images", "boxes") or key.startswith("aug_"):
            name = {"images": "image", "boxes": "boxes"}.get(key, key)
            for view in range(2):
                out[_view_key(name, view)] = value[:, view]
        else:
            out[key] = value
    return {k: tf.reshape(v, tf.concat([[local_devices, per_device], tf.shape(v)[1:]], 0))
            for k, v in out.items()}


def _view_key(name, view):
    if name.startswith("aug_"):
        return f"aug{view + 1}_{name[4:]}"
    return f"{name}{view + 1}"


def _options(num_threads):
    options = tf.data.Options()
    options.deterministic = True
    if num_threads:
        options.threading.private_threadpool_size = num_threads
        options.threading.max_intra_op_parallelism = 1
    return options


class Batches(collections.abc.Iterator):
    """Iterator of numpy batches.

    Attributes:
      dataset: the underlying tf.data pipeline (batches before conversion to numpy).
      source_name: the opened source's description.
      steps_per_epoch: full batches per epoch on this host (num_examples // process_count // batch).
      skipped: undecodable images skipped so far (also logged as a warning when it grows).
    """

    def __init__(self, dataset: tf.data.Dataset, source_name: str, steps_per_epoch: int, start: int):
        self.dataset = dataset
        self.source_name = source_name
        self.steps_per_epoch = steps_per_epoch
        self.skipped = 0
        self._next_position = start
        self._iterator = dataset.as_numpy_iterator()

    def __next__(self) -> dict:
        batch = next(self._iterator)
        positions = batch["position"].reshape(-1)
        # Replaced images are counted per sample; dropped ones leave gaps in the positions.
        newly = int(batch.pop("skipped").sum()) + int(positions[-1] - self._next_position + 1 - positions.size)
        self._next_position = int(positions[-1]) + 1
        if newly:
            self.skipped += newly
            logging.warning("input pipeline: skipped %d undecodable image(s) in %s (total %d)", newly,
                            self.source_name, self.skipped)
        return batch
