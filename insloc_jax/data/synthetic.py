"""The embedded dataset: procedurally generated, natural-looking images with class labels.

Each image is a textured background (low-frequency colour fields plus fine grain) with one main object and
one to three smaller distractors. The class decides the main object's shape and its texture family;
everything else (hue, saturation, size, position, rotation, texture frequency and phase, shading,
distractors, background) is drawn per instance, so two images of one class are never alike and instance
discrimination stays non-trivial. Colour is deliberately not a class cue: an untrained network reads an
object's mean hue straight off its pixels, so hue-coded classes made kNN on random features score as well as
on pretrained ones, and the training augmentation (colour jitter, grayscale) teaches invariance to it anyway.
Labels make the set usable by quality probes (kNN, retrieval).

It needs no download: `prepare(data_dir, ...)` writes it once as JPEG files (quality 95) with a file list
per split, and later calls reuse it; `sources.open_source({"kind": "synthetic", ...})` opens a split. The
layout, one directory per setting and dataset version, so different sizes live side by side:

  data_dir/insloc_synthetic/s{image_size}_tr{num_train}_te{num_test}_c{num_classes}_seed{seed}/3.0.0/
      info.json              the settings, the version and the split sizes
      train.txt, test.txt    one line per image, "train/000123.jpg LABEL" (a sources file list)
      train/000000.jpg ...   the images of each split, named by index
      test/000000.jpg ...

A generation writes into a temporary sibling directory and renames it into place when it is complete, so a
killed one never leaves a set that counts as prepared (its leftover is removed by the next generation on the
same host; see prepared.py). It runs on every core once the set is large enough to pay for starting the
workers: about 1.5 ms per 112-pixel image and core, JPEG encoding included (the demo's 4,096 + 2,048 images
in about 7 s on two cores).

Image i of a split is drawn from `np.random.default_rng([seed, split_id, i])` alone, so the set is
reproducible from its seed and independent of generation order.
"""
import functools
import io
import json
import multiprocessing
import os
import threading

import numpy as np

from insloc_jax.data import prepared, shapes

SPLIT_IDS = {"train": 0, "test": 1}
PARALLEL_FROM = 512  # images in the whole set from which generation runs on every core
MAX_WORKERS = 8
BLOCK = 64  # images per task of a worker
DATASET_VERSION = "3.0.0"
RELEASE_NOTES = {
    "1.0.0": "Hue, shape and texture coded the class.",
    "2.0.0": "Shape and texture code the class; the main object's hue is drawn per instance.",
    "3.0.0": "Stored as JPEG files (quality 95) with a file list per split instead of a TFDS dataset. The "
             "same images: drawn bit-identically (several times faster), and the files decode to the pixels "
             "that 2.0.0 stored.",
}
JPEG_QUALITY = 95
MAX_CLASSES = len(shapes.SHAPES) * len(shapes.TEXTURES)
_SCRATCH = threading.local()  # per-thread work arrays of generate_image


def config_name(image_size: int, num_train: int, num_test: int, num_classes: int, seed: int) -> str:
    """A directory name that encodes every setting, so different sizes live side by side in one data_dir."""
    return f"s{image_size}_tr{num_train}_te{num_test}_c{num_classes}_seed{seed}"


def dataset_dir(data_dir: str, image_size: int = 112, num_train: int = 4096, num_test: int = 512,
                num_classes: int = 10, seed: int = 0) -> str:
    """Where `prepare` puts the set of these settings (see the module docstring)."""
    name = config_name(int(image_size), int(num_train), int(num_test), int(num_classes), int(seed))
    return os.path.join(data_dir, "insloc_synthetic", name, DATASET_VERSION)


def prepare(data_dir: str, image_size: int = 112, num_train: int = 4096, num_test: int = 512,
            num_classes: int = 10, seed: int = 0) -> str:
    """Returns the directory of the set of these settings, generating it first if it is not there yet.

    Args:
      data_dir: directory holding prepared sets (e.g. /tmp/insloc_data).
      image_size: side of the square images in pixels.
      num_train: images in the `train` split.
      num_test: images in the held-out `test` split.
      num_classes: number of classes (at most MAX_CLASSES: the shape x texture combinations).
      seed: generation seed.

    Returns:
      The set's directory (layout in the module docstring).
    """
    fields = dict(image_size=int(image_size), num_train=int(num_train), num_test=int(num_test),
                  num_classes=int(num_classes), seed=int(seed))
    if fields["image_size"] < 8 or fields["num_train"] < 1 or fields["num_test"] < 0:
        raise ValueError(f"the embedded dataset needs image_size >= 8, num_train >= 1 and num_test >= 0, got "
                         f"{fields}")
    if not 1 <= fields["num_classes"] <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES} (shape x texture), got {num_classes}")
    final = dataset_dir(data_dir, **fields)
    return prepared.prepare_once(final, functools.partial(_generate, fields=fields), "embedded dataset")


def _generate(work: str, fields: dict) -> None:
    """Writes every image, the file lists and info.json (last) into the empty directory `work`."""
    counts = {"train": fields["num_train"], "test": fields["num_test"]}
    tasks = []
    for split, count in counts.items():
        os.makedirs(os.path.join(work, split))
        tasks += [(split, start, min(start + BLOCK, count)) for start in range(0, count, BLOCK)]
    labels = {split: np.zeros(count, np.int64) for split, count in counts.items()}
    write = functools.partial(_write_block, work, fields["seed"], fields["image_size"], fields["num_classes"])
    total = sum(counts.values())
    from tqdm import tqdm

    with tqdm(total=total, desc="generating the embedded dataset", unit=" images", delay=2.0,
              mininterval=0.5) as bar:
        for split, start, block in _map_blocks(write, tasks, total):
            labels[split][start:start + len(block)] = block
            bar.update(len(block))
    for split, count in counts.items():
        with open(os.path.join(work, f"{split}.txt"), "w") as f:
            f.writelines(f"{_file_name(split, i)} {label}\n" for i, label in enumerate(labels[split]))
    info = dict(fields, version=DATASET_VERSION, format=f"JPEG quality {JPEG_QUALITY}", splits=counts)
    with open(os.path.join(work, prepared.INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)


def _map_blocks(write, tasks, total: int):
    """write(*task) for every task; on every core once the set is large enough to pay for starting the
    workers (each image depends on its index alone, so the files are the same)."""
    workers = min(os.cpu_count() or 1, MAX_WORKERS, len(tasks))
    if total < PARALLEL_FROM or workers < 2:
        yield from (write(*task) for task in tasks)
        return
    # Spawned, not forked: the parent may have JAX's threads running.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_keep_freed_memory) as pool:
        yield from pool.imap_unordered(_star, [(write, task) for task in tasks])


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


def _star(job):
    write, task = job
    return write(*task)


def _file_name(split: str, index: int) -> str:
    return f"{split}/{index:06d}.jpg"


def _write_block(work: str, seed: int, size: int, num_classes: int, split: str, start: int, stop: int):
    """Draws images start..stop-1 of a split and writes them as JPEG; returns (split, start, labels)."""
    from PIL import Image

    labels = []
    for index in range(start, stop):
        image, label = generate_image(seed, SPLIT_IDS[split], index, size, num_classes)
        encoded = io.BytesIO()  # encoded in memory and written at once: faster than saving to the path
        Image.fromarray(image).save(encoded, format="JPEG", quality=JPEG_QUALITY)
        with open(os.path.join(work, _file_name(split, index)), "wb") as f:
            f.write(encoded.getbuffer())
        labels.append(label)
    return split, start, labels


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
        draw_object(canvas, rng, shape=int(rng.integers(len(shapes.SHAPES))),
                    texture=int(rng.integers(len(shapes.TEXTURES))), hue=rng.random(),
                    radius=rng.uniform(0.12, 0.25))
    shape, texture = class_style(label)
    draw_object(canvas, rng, shape, texture, hue=rng.random(), radius=rng.uniform(0.3, 0.6))
    return add_grain(canvas, rng, grain), label


def add_grain(canvas: np.ndarray, rng: np.random.Generator, grain=None) -> np.ndarray:
    """Adds the images' fine grain (Gaussian, sd 4 levels) to a painted canvas and quantises it.

    Args:
      canvas: float64 [S, S, 3] painted image, 0..255; overwritten.
      rng: the image's generator (draws S * S * 3 normals).
      grain: optional float64 [S, S, 3] work array (reused buffers spare the page faults of a fresh one).

    Returns:
      uint8 [S, S, 3] image.
    """
    grain = np.empty_like(canvas) if grain is None else grain
    rng.standard_normal(out=grain)
    grain *= 4.0  # the values of rng.normal(0, 4, shape), drawn into the work array
    canvas += grain
    np.clip(canvas, 0, 255, out=canvas)
    return np.rint(canvas, out=canvas).astype(np.uint8)


def class_style(label: int):
    """The class-defining attributes: (shape id, texture id)."""
    shape = label % len(shapes.SHAPES)
    texture = (label // len(shapes.SHAPES) + 2 * label) % len(shapes.TEXTURES)
    return shape, texture


def draw_object(canvas: np.ndarray, rng: np.random.Generator, shape: int, texture: int, hue: float,
                radius: float):
    """Pastes one shaded, textured object onto canvas, in place, and says which pixels it painted.

    Only the pixels of the object's bounding square are computed: no shape reaches farther from its
    centre than shapes.SHAPE_EXTENT * max(aspect, 1) object radii. The centre is drawn uniformly within
    0.6 of the image centre, in the coordinates where the image spans -1..1.

    Args:
      canvas: float64 [S, S, 3] image, 0..255.
      rng: the image's generator (draws position, pose, texture and colours).
      shape: index into shapes.SHAPES.
      texture: index into shapes.TEXTURES.
      hue: main hue in [0, 1).
      radius: nominal object radius in image coordinates (the image spans -1..1, so 1 is half its side).

    Returns:
      (rows, cols, mask): the slices of the window the object was drawn in and the bool [h, w] mask of
      the painted pixels within it, i.e. `canvas[rows, cols][mask]` is the object.
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
    return rows, cols, mask


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
