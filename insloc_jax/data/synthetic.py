"""The embedded dataset: procedurally generated, natural-looking images with class labels.

Each image is a textured background (low-frequency colour fields plus fine grain) with one main object and
one to three smaller distractors. The class decides the main object's shape and its texture family;
everything else (hue, saturation, size, position, rotation, texture frequency and phase, shading,
distractors, background) is drawn per instance, so two images of one class are never alike and instance
discrimination stays non-trivial. Colour is deliberately not a class cue: an untrained network reads an
object's mean hue straight off its pixels, so hue-coded classes made kNN on random features score as well as
on pretrained ones, and the training augmentation (colour jitter, grayscale) teaches invariance to it anyway.
Labels make the set usable by quality probes (kNN, retrieval).

It is a TFDS builder (`insloc_synthetic`) so it goes through the same tf.data path as ImageNet. It needs no
download: `prepare(data_dir)` writes it once (on every core; about 1-2 ms per 112-pixel image and core) and
later calls reuse it.
Image i of a split is drawn from `np.random.default_rng([seed, split_id, i])` alone, so the set is
reproducible from its seed and independent of generation order.
"""
import dataclasses
import functools
import multiprocessing
import os
import threading

import numpy as np
import tensorflow_datasets as tfds

from insloc_jax.data import shapes

SPLIT_IDS = {"train": 0, "test": 1}
PARALLEL_FROM = 512  # images of a split from which generation runs on every core
MAX_WORKERS = 8
_SCRATCH = threading.local()  # per-thread work arrays of generate_image
DATASET_VERSION = "2.0.0"  # 2.0.0: the main object's hue is drawn per instance instead of per class


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """Sizes of the embedded dataset; the config name must change whenever a field does.

    Attributes:
      image_size: side of the square images in pixels.
      num_train: images in the `train` split.
      num_test: images in the held-out `test` split.
      num_classes: number of classes (at most len(shapes.SHAPES) * len(shapes.TEXTURES)).
      seed: generation seed.
    """
    image_size: int = 112
    num_train: int = 4096
    num_test: int = 512
    num_classes: int = 10
    seed: int = 0


def config_name(image_size: int, num_train: int, num_test: int, num_classes: int, seed: int) -> str:
    """A config name that encodes every field, so different sizes live side by side in one data_dir."""
    return f"s{image_size}_tr{num_train}_te{num_test}_c{num_classes}_seed{seed}"


def make_config(**kwargs) -> SyntheticConfig:
    """Builds a SyntheticConfig with a name derived from its fields (see SyntheticConfig for kwargs)."""
    defaults = SyntheticConfig(name="defaults")
    names = ("image_size", "num_train", "num_test", "num_classes", "seed")
    unknown = set(kwargs) - set(names)
    if unknown:
        raise ValueError(f"unknown synthetic dataset options {sorted(unknown)}; expected some of {names}")
    fields = {k: int(kwargs.get(k, getattr(defaults, k))) for k in names}
    return SyntheticConfig(name=config_name(**fields), version=DATASET_VERSION, **fields)


class InslocSynthetic(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the embedded procedural dataset (splits `train` and `test`)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {"1.0.0": "Hue, shape and texture coded the class.",
                     "2.0.0": "Shape and texture code the class; the main object's hue is drawn per instance."}
    BUILDER_CONFIGS = [make_config()]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description="Procedural textured shapes on textured backgrounds, labelled by main-object class.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
                "index": np.int64,
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "test": self._generate_examples("test", cfg.num_test)}

    def _generate_examples(self, split: str, count: int):
        cfg = self.builder_config
        draw = functools.partial(_draw_indexed, cfg.seed, SPLIT_IDS[split], cfg.image_size, cfg.num_classes)
        for i, image, label in _map_in_parallel(draw, count):
            yield i, {"image": image, "label": label, "index": i}


def _draw_indexed(seed: int, split_id: int, size: int, num_classes: int, index: int):
    return (index, *generate_image(seed, split_id, index, size, num_classes))


def _map_in_parallel(draw, count: int):
    """draw(i) for i in range(count), in order; on every core once the split is large enough to pay for
    starting the workers (each image depends on its index alone, so the result is the same)."""
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    if count < PARALLEL_FROM or workers < 2:
        yield from map(draw, range(count))
        return
    # Spawned, not forked: the parent has TensorFlow's and JAX's threads running.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_keep_freed_memory) as pool:
        yield from pool.imap(draw, range(count), chunksize=64)


def _keep_freed_memory() -> None:
    """Lets a worker's glibc keep freed memory instead of returning it to the system after every image.

    Drawing an image allocates and frees arrays of ~100 kB; by default glibc hands such memory back and
    page-faults it in again for the next image, which costs about a third of the drawing time. Only the
    short-lived generation workers are changed; elsewhere (no glibc) this does nothing.
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    trim_threshold, top_pad, mmap_threshold = -1, -2, -3  # M_* parameters of glibc's malloc.h
    mallopt(trim_threshold, 256 << 20)
    mallopt(top_pad, 64 << 20)
    mallopt(mmap_threshold, 32 << 20)


def _buffers(size: int):
    """This thread's two float64 [size, size, 3] work arrays (canvas, grain), reused from image to image."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None or buffers[0].shape[0] != size:
        buffers = _SCRATCH.buffers = (np.empty((size, size, 3)), np.empty((size, size, 3)))
    return buffers


@functools.lru_cache(maxsize=4)
def _axis(size: int) -> np.ndarray:
    """Pixel centres along one side, -1 .. 1 (shared, read-only)."""
    axis = np.linspace(-1, 1, size)
    axis.flags.writeable = False
    return axis


def generate_image(seed: int, split_id: int, index: int, size: int, num_classes: int):
    """Draws one image and its label.

    Args:
      seed: dataset seed.
      split_id: 0 for train, 1 for test (different images, same distribution).
      index: image index within the split.
      size: image side in pixels.
      num_classes: number of classes; the label is uniform over them.

    Returns:
      (uint8 [size, size, 3] image, int label).
    """
    rng = np.random.default_rng([seed, split_id, index])
    label = int(rng.integers(num_classes))
    canvas, grain = _buffers(size)
    shapes.background(rng, size, out=canvas)
    for _ in range(int(rng.integers(1, 4))):
        _draw_object(canvas, rng, shape=int(rng.integers(len(shapes.SHAPES))),
                     texture=int(rng.integers(len(shapes.TEXTURES))), hue=rng.random(),
                     radius=rng.uniform(0.12, 0.25))
    shape, texture = class_style(label)
    _draw_object(canvas, rng, shape, texture, hue=rng.random(), radius=rng.uniform(0.3, 0.6))
    rng.standard_normal(out=grain)
    grain *= 4.0  # the values of rng.normal(0, 4, shape), drawn into the reused buffer
    canvas += grain
    np.clip(canvas, 0, 255, out=canvas)
    return np.rint(canvas, out=canvas).astype(np.uint8), label


def class_style(label: int):
    """The class-defining attributes: (shape id, texture id)."""
    shape = label % len(shapes.SHAPES)
    texture = (label // len(shapes.SHAPES) + 2 * label) % len(shapes.TEXTURES)
    return shape, texture


def _draw_object(canvas, rng, shape, texture, hue, radius):
    """Pastes one shaded, textured object onto canvas (float [S, S, 3], 0..255), in place.

    Only the pixels of the object's bounding square are computed: no shape reaches farther from its
    centre than shapes.SHAPE_EXTENT * max(aspect, 1) object radii.
    """
    cx, cy = rng.uniform(-0.6, 0.6, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.7, 1.3)
    axis = _axis(canvas.shape[0])
    reach = radius * shapes.SHAPE_EXTENT * max(aspect, 1.0)
    cols, rows = _span(axis, cx, reach), _span(axis, cy, reach)  # never empty: |cx|, |cy| <= 0.6
    dx, dy = axis[None, cols] - cx, axis[rows, None] - cy  # [1, w], [h, 1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / radius
    v = (-dx * sin + dy * cos) / radius
    mask = shapes.shape_mask(shape, u, v, aspect=aspect)
    pattern = shapes.texture(texture, u, v, rng)  # [h, w] in 0..1
    light = 0.75 + 0.25 * np.clip(1.0 - 0.5 * ((u - 0.3) ** 2 + (v + 0.3) ** 2), 0, 1)
    colour_a, colour_b = _colours(rng, hue)
    rest = 1 - pattern
    for c in range(3):  # one channel plane at a time: broadcasting over a last axis of 3 is slow
        fill = (pattern * colour_a[c] + rest * colour_b[c]) * light
        np.copyto(canvas[rows, cols, c], fill, where=mask)


def _colours(rng, hue):
    colour_a = shapes.hsv_colour(hue % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    colour_b = shapes.hsv_colour((hue + rng.uniform(-0.08, 0.08)) % 1.0, rng.uniform(0.2, 0.8),
                                 rng.uniform(0.2, 0.6))
    return colour_a, colour_b


def _span(axis: np.ndarray, centre: float, reach: float) -> slice:
    """The pixels whose coordinate lies within `reach` of `centre` (plus one pixel on each side)."""
    step = axis[1] - axis[0]
    low = int(np.floor((centre - reach + 1.0) / step)) - 1
    high = int(np.ceil((centre + reach + 1.0) / step)) + 2
    return slice(max(low, 0), min(high, len(axis)))


def prepare(data_dir: str, **config_kwargs) -> tfds.core.DatasetBuilder:
    """Returns the builder for these sizes, generating the dataset into data_dir if it is not there yet.

    Args:
      data_dir: TFDS data directory (e.g. /tmp/insloc_data).
      **config_kwargs: SyntheticConfig fields (image_size, num_train, num_test, num_classes, seed).

    Returns:
      A prepared tfds builder; read it with `builder.as_dataset(split=...)`.
    """
    config = make_config(**config_kwargs)
    # tfds refuses a custom config named like a registered one: pass the registered one by name.
    registered = {c.name for c in InslocSynthetic.BUILDER_CONFIGS}
    builder = InslocSynthetic(config=config.name if config.name in registered else config, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return builder
