"""The held-out data of the frozen-feature probes: settings, composites, jittered boxes, whole images.

Built once per evaluation run with the data package and kept in host memory as numpy, so the
probes themselves (`evaluate.score_probes`) only feed arrays to the network. Every random draw is a stateless
function of (eval seed, instance, view), with a purpose of its own so no draw repeats a training draw.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import ml_collections
import numpy as np

from insloc_jax import config as config_lib
from insloc_jax.eval import probes

EVAL_PURPOSE = 100  # added to the seeds purposes so no eval draw repeats a training draw


@dataclasses.dataclass(frozen=True)
class Settings:
    """Probe settings; `from_config` reads them from `config.eval` when the config has that section.

    Attributes:
      seed: composition, augmentation and jitter seed of the probe data.
      num_test: held-out images used (0 = the whole split).
      num_bank: kNN memory-bank images from the train split (0 = the whole split).
      train_split / test_split: split names of the source (e.g. "validation" for ImageNet).
      augment: apply the training pixel augmentation (colour, gray, blur, flip) to the composites (off by
        default: the probes ask for the same instance on new backgrounds, and colour jitter and grayscale
        erase the colours that tell instances of one class apart, leaving every model near chance).
      batch_size: images per forward pass.
      fit_fraction: share of the held-out instances the box probe is fitted on.
      jitters: jittered starting boxes per composite for the box probe (each one a row of its fit or score
        set), so the linear probe has several times more rows than a 512-image split alone would give.
    """

    seed: int = 0
    num_test: int = 0
    num_bank: int = 0
    train_split: str = "train"
    test_split: str = "test"
    augment: bool = False
    batch_size: int = 64
    fit_fraction: float = 0.5
    jitters: int = 4

    def __post_init__(self):
        if self.jitters < 1:
            raise config_lib.ConfigError(f"eval.jitters={self.jitters}: the box probe needs at least 1 jittered "
                                         "box per composite")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Settings":
        section = config.get("eval") or {}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(section).items() if k in names})


@dataclasses.dataclass(frozen=True)
class ProbeData:
    """Everything the probes feed the network, built once (numpy, host memory).

    Attributes:
      composites: float32 [2, N, S, S, 3] normalised views of the N held-out instances.
      boxes: float32 [2, N, 4] their true boxes (xyxy, canvas pixels).
      jittered: float32 [2, N, J, 4] the box probe's J starting boxes per composite.
      whole: float32 [M + Q, s, s, 3] normalised whole images: M memory-bank, then Q held-out.
      labels: int64 [M + Q] their labels (-1 = unknown).
      num_bank: M.
    """

    composites: np.ndarray
    boxes: np.ndarray
    jittered: np.ndarray
    whole: np.ndarray
    labels: np.ndarray
    num_bank: int


def read_split(spec: Dict[str, Any], limit: int):
    """(list of uint8 [H, W, 3] images, int64 [n] labels): the first `limit` images (0 = all)."""
    from insloc_jax.data import sources

    source = sources.open_source(spec)
    stop = min(limit, source.num_examples) if limit else source.num_examples
    images, labels = [], []
    for example in sources.examples(source, 0, stop):
        images.append(example["image"])
        labels.append(example["label"])
    return images, np.asarray(labels, np.int64)


def make_composites(images, seed: int, canvas_size: int, fg_size_range, augment: bool):
    """Two composites of every image, each pasted on another image of the list (never itself).

    Args:
      images: N >= 2 uint8 [H, W, 3] foregrounds, which also serve as the backgrounds.
      seed: probe seed; every draw is a stateless function of (seed, instance, view).
      canvas_size: S.
      fg_size_range: (low, high) target size of the pasted foreground.
      augment: apply the training pixel augmentation after pasting.

    Returns:
      (float32 [2, N, S, S, 3] normalised composites, float32 [2, N, 4] boxes).
    """
    from insloc_jax.data import augment as pixel, compose, seeds

    n = len(images)
    if n < 2:
        raise ValueError("the retrieval probe needs at least 2 held-out images")
    offsets = np.random.default_rng([seed, EVAL_PURPOSE]).integers(0, n - 1, (n, 2))
    partners = (np.arange(n)[:, None] + 1 + offsets) % n  # [N, 2] background image of each view
    backgrounds = [compose.resize_uint8(image, (canvas_size, canvas_size)) for image in images]
    views = np.zeros((2, n, canvas_size, canvas_size, 3), np.float32)
    boxes = np.zeros((2, n, 4), np.float32)
    for i in range(n):
        for v in range(2):
            patch, box = compose.foreground(images[i], seeds.rng(seed, EVAL_PURPOSE + seeds.VIEW, i, v),
                                            canvas_size, tuple(fg_size_range))
            pasted = compose.paste(patch, box, backgrounds[partners[i, v]])
            if augment:
                params = pixel.sample_params(seeds.rng(seed, EVAL_PURPOSE + seeds.AUGMENT, i, v))
                views[v, i], boxes[v, i] = pixel.augment(pasted, box, params)
            else:
                views[v, i], boxes[v, i] = pixel.normalize(pasted.astype(np.float32)), box
    return views, boxes


def whole_images(images, size: int) -> np.ndarray:
    """uint8 images -> float32 [n, size, size, 3], resized (bilinear) and normalised."""
    from insloc_jax.data import augment as pixel, compose

    return np.stack([pixel.normalize(compose.resize_uint8(image, (size, size)).astype(np.float32))
                     for image in images])


def jittered_boxes(boxes: np.ndarray, settings: Settings, canvas: int, shift: float = 0.25,
                   max_scale: float = 1.5) -> np.ndarray:
    """The box probe's starting boxes: `settings.jitters` perturbations of every true box.

    Args:
      boxes: [..., 4] true boxes (the composites' [2, N, 4]).
      settings: probe settings (jitters per box, seed).
      canvas: canvas side in pixels.
      shift, max_scale: jitter strength (`probes.jitter_boxes`; the defaults are the probes' own).

    Returns:
      [..., J, 4] float32, each row jittered anew from its true box.
    """
    starts = np.repeat(boxes.reshape(-1, 4), settings.jitters, axis=0)  # [B * J, 4]
    jittered = probes.jitter_boxes(starts, settings.seed, canvas, shift, max_scale)
    return jittered.reshape(*boxes.shape[:-1], settings.jitters, 4).astype(np.float32)


def load_probe_data(config: ml_collections.ConfigDict, settings: Settings,
                    source: Optional[Dict[str, Any]] = None) -> ProbeData:
    """Reads the splits and builds the composites, jittered boxes and whole images (once).

    Args:
      config: run config (data.source, canvas_size, fg_size_range, moco_size).
      settings: probe settings.
      source: a source spec overriding config.data.source (its split is replaced per use).
    """
    spec = dict(source) if source is not None else config_lib.source_spec(config)
    test_images, test_labels = read_split(dict(spec, split=settings.test_split), settings.num_test)
    bank_images, bank_labels = read_split(dict(spec, split=settings.train_split), settings.num_bank)
    canvas = config.data.canvas_size
    composites, boxes = make_composites(test_images, settings.seed, canvas, config.data.fg_size_range,
                                        settings.augment)
    jittered = jittered_boxes(boxes, settings, canvas)
    return ProbeData(
        composites=composites, boxes=boxes, jittered=jittered,
        whole=whole_images(bank_images + test_images, config.data.moco_size),
        labels=np.concatenate([bank_labels, test_labels]), num_bank=len(bank_images),
    )
