"""The embedded instance-segmentation dataset: scenes of the pretraining set's objects, in COCO format.

Fine-tuning a detector (Mask R-CNN) needs boxes and masks; this set provides them without a download. A
scene is a background of the pretraining set (shapes.background) with 1 to MAX_OBJECTS objects painted one
after another by synthetic.draw_object, then the pretraining images' grain. Each object belongs to one of
`num_classes` classes of the pretraining set: the class fixes shape and texture family
(synthetic.class_style), everything else (hue, saturation, position, rotation, aspect, texture frequency)
is drawn per object. Every painted object is an instance; there are no unlabelled distractors.

Objects overlap freely and later ones occlude earlier ones. An instance's mask is exact: the pixels its
shape painted minus those later objects painted over. Its box is the tight box of that mask and its area
the mask's pixel count. An object left with fewer than MIN_VISIBLE_PIXELS (20) visible pixels is dropped
(its few visible pixels stay painted, as a hidden object's would); about 13 % of the painted objects are.
An object no later one covers is never dropped: the smallest (MIN_RADIUS_PX) paints at least 28 pixels and
lies wholly inside the image (at MIN_IMAGE_SIZE and up). So an image holds 1 to MAX_OBJECTS instances.

Object radii are log-uniform between MIN_RADIUS_PX (6) pixels and MAX_RADIUS (0.7) times the image side,
so sizes span COCO's area ranges (pycocotools counts absolute pixels: small < 32^2, medium 32^2..96^2,
large > 96^2; here an area of exactly 96^2 counts as medium). At the default 128 pixels the visible areas
run from 20 to about 16,000 pixels, the median about 1,000: roughly 51 % of the instances are small, 45 %
medium and 4 % large (each split's exact counts are in info.json). Smaller images hold smaller objects: a
64-pixel set has small and medium ones only.

It needs no download: `prepare(data_dir, ...)` writes it once as JPEG files (quality 95) with a COCO
instances file per split, and later calls reuse it (generated atomically, see prepared.py). Generation
runs in one process, about 3 ms per 128-pixel scene with JPEG and RLE encoding: the default 1,000 + 500
images take about 5 s. The layout, one directory per setting and dataset version:

  data_dir/insloc_scenes/s{image_size}_tr{num_train}_va{num_val}_c{num_classes}_seed{seed}/1.0.0/
      info.json                     settings, version, release notes, per-split counts
      annotations/instances_train.json, annotations/instances_val.json
      train/000000.jpg ...          the images of each split, named by index (file_name in the JSON)
      val/000000.jpg ...

COCO conventions: image and annotation ids start at 1, category ids are 1..num_classes (class label + 1,
named "<shape>-<texture>", supercategory the shape), bbox is [x, y, w, h] with x the first column of the
mask and w its number of columns (likewise y and h), area is the mask's pixel count, segmentation is the
compressed RLE of pycocotools.mask.encode with its counts as a str, iscrowd is 0.

Scene i of a split is drawn from `np.random.default_rng([seed, SCENES_STREAM, split_id, i])` alone. The
pretraining images use `[seed, split_id, i]` with split_id 0 or 1, so the second word (SCENES_STREAM, neither
0 nor 1) keeps every scene on a stream of its own; it must not be 0 or 1, because SeedSequence pads short
entropy with zeros ([a, b, c] and [a, b, c, 0] give the same generator).
"""
import functools
import io
import json
import os

import numpy as np

from insloc_jax.data import prepared, shapes, synthetic

SPLIT_IDS = {"train": 0, "val": 1}
SCENES_STREAM = 0x5CE7E5  # second seed word of every scene; pretraining images have 0 or 1 there
DATASET_VERSION = "1.0.0"
RELEASE_NOTES = {
    "1.0.0": "Scenes of 1 to 6 objects of the pretraining classes with exact visible masks, COCO format.",
}
JPEG_QUALITY = 95
MAX_OBJECTS = 6
MIN_VISIBLE_PIXELS = 20  # instances with fewer visible pixels are dropped
MIN_RADIUS_PX = 6.0  # the smallest object (a triangle of aspect 0.7) still paints 28 pixels or more
MAX_RADIUS = 0.7  # largest object radius, as a fraction of the image side
MIN_IMAGE_SIZE = 64  # from here the smallest object lies wholly inside the image (a 12 px margin)
MAX_CLASSES = synthetic.MAX_CLASSES
SMALL_AREA, LARGE_AREA = 32 ** 2, 96 ** 2  # COCO's size ranges, in absolute pixels


def config_name(image_size: int, num_train: int, num_val: int, num_classes: int, seed: int) -> str:
    """A directory name that encodes every setting, so different sets live side by side in one data_dir."""
    return f"s{image_size}_tr{num_train}_va{num_val}_c{num_classes}_seed{seed}"


def dataset_dir(data_dir: str, image_size: int = 128, num_train: int = 1000, num_val: int = 500,
                num_classes: int = 10, seed: int = 0) -> str:
    """Where `prepare` puts the set of these settings (see the module docstring)."""
    name = config_name(int(image_size), int(num_train), int(num_val), int(num_classes), int(seed))
    return os.path.join(data_dir, "insloc_scenes", name, DATASET_VERSION)


def prepare(data_dir: str, image_size: int = 128, num_train: int = 1000, num_val: int = 500,
            num_classes: int = 10, seed: int = 0) -> str:
    """Returns the directory of the set of these settings, generating it first if it is not there yet.

    Args:
      data_dir: directory holding prepared sets (e.g. /tmp/insloc_data).
      image_size: side of the square images in pixels (at least MIN_IMAGE_SIZE).
      num_train: images in the `train` split (at least 1).
      num_val: images in the `val` split (at least 1).
      num_classes: number of classes, 1..MAX_CLASSES (the shape x texture combinations).
      seed: generation seed (non-negative).

    Returns:
      The set's directory (layout in the module docstring).

    Raises:
      ValueError: a setting is out of range (the message names it).
    """
    fields = _checked(image_size=image_size, num_train=num_train, num_val=num_val, num_classes=num_classes,
                      seed=seed)
    final = dataset_dir(data_dir, **fields)
    return prepared.prepare_once(final, functools.partial(_generate, fields=fields), "embedded scene dataset")


def split_paths(directory: str, split: str):
    """The image directory and the COCO instances file of one split of a prepared set.

    Args:
      directory: a set's directory, as `prepare` returns it.
      split: "train" or "val".

    Returns:
      (image_dir, annotations_json); the JSON's file_name entries are relative to image_dir.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    return os.path.join(directory, split), os.path.join(directory, "annotations", f"instances_{split}.json")


def _checked(**fields) -> dict:
    """The settings as ints, or a ValueError naming the first one out of range."""
    fields = {name: int(value) for name, value in fields.items()}
    limits = dict(image_size=(MIN_IMAGE_SIZE, None), num_train=(1, None), num_val=(1, None),
                  num_classes=(1, MAX_CLASSES), seed=(0, None))
    for name, (low, high) in limits.items():
        value = fields[name]
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in {low}..{high}"
            raise ValueError(f"embedded scene dataset: {name} must be {span}, got {value}")
    return fields


def size_range(area: int) -> str:
    """COCO's size range of an instance area in pixels: "small" (< 32^2), "medium", "large" (> 96^2)."""
    if area < SMALL_AREA:
        return "small"
    return "medium" if area <= LARGE_AREA else "large"


def categories(num_classes: int) -> list:
    """The COCO "categories" entries: id = label + 1, name "<shape>-<texture>", supercategory the shape."""
    entries = []
    for label in range(num_classes):
        shape, texture = synthetic.class_style(label)
        entries.append(dict(id=label + 1, name=f"{shapes.SHAPES[shape]}-{shapes.TEXTURES[texture]}",
                            supercategory=shapes.SHAPES[shape]))
    return entries


def _generate(work: str, fields: dict) -> None:
    """Writes every image, both instances files and info.json (last) into the empty directory `work`."""
    from tqdm import tqdm

    sizes = {"train": fields["num_train"], "val": fields["num_val"]}
    os.makedirs(os.path.join(work, "annotations"))
    counts = {}
    with tqdm(total=sum(sizes.values()), desc="generating the embedded scene dataset", unit=" images",
              delay=2.0, mininterval=0.5) as bar:
        for split, count in sizes.items():
            counts[split] = _write_split(work, split, count, fields, bar.update)
    info = dict(fields, version=DATASET_VERSION, release_notes=RELEASE_NOTES[DATASET_VERSION],
                format=f"JPEG quality {JPEG_QUALITY}, COCO instances", min_visible_pixels=MIN_VISIBLE_PIXELS,
                splits=counts)
    with open(os.path.join(work, prepared.INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)


def _write_split(work: str, split: str, count: int, fields: dict, advance) -> dict:
    """Draws and writes the images of one split and its instances file; returns the split's counts."""
    image_dir, annotations_json = split_paths(work, split)
    os.makedirs(image_dir)
    images, annotations = [], []
    dropped = 0
    for index in range(count):
        image, labels, owner = draw_scene(fields["seed"], SPLIT_IDS[split], index, fields["image_size"],
                                          fields["num_classes"])
        instances = visible_instances(labels, owner)
        dropped += len(labels) - len(instances)
        file_name = f"{index:06d}.jpg"
        _write_jpeg(image, os.path.join(image_dir, file_name))
        images.append(dict(id=index + 1, file_name=file_name, width=image.shape[1], height=image.shape[0]))
        for label, mask in instances:
            annotations.append(annotation(mask, label, image_id=index + 1, annotation_id=len(annotations) + 1))
        advance(1)
    coco = dict(info=dict(description=f"insloc embedded scenes {DATASET_VERSION}, {split}"), images=images,
                annotations=annotations, categories=categories(fields["num_classes"]))
    with open(annotations_json, "w") as f:
        json.dump(coco, f)
    ranges = [size_range(a["area"]) for a in annotations]
    return dict(images=count, instances=len(annotations), dropped=dropped,
                **{name: ranges.count(name) for name in ("small", "medium", "large")})


def _write_jpeg(image: np.ndarray, path: str) -> None:
    from PIL import Image

    encoded = io.BytesIO()  # encoded in memory and written at once: faster than saving to the path
    Image.fromarray(image).save(encoded, format="JPEG", quality=JPEG_QUALITY)
    with open(path, "wb") as f:
        f.write(encoded.getbuffer())


def annotation(mask: np.ndarray, label: int, image_id: int, annotation_id: int) -> dict:
    """One COCO "annotations" entry of a visible mask.

    Args:
      mask: bool [H, W] visible mask, not empty.
      label: class label, 0..num_classes-1 (category_id is label + 1).
      image_id: the image's id (from 1).
      annotation_id: this annotation's id (from 1).

    Returns:
      dict with id, image_id, category_id, bbox [x, y, w, h] (tight on the mask's pixels), area (pixel
      count), iscrowd 0 and segmentation (RLE with str counts).
    """
    from pycocotools import mask as mask_utils

    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    segmentation = dict(size=[int(n) for n in rle["size"]], counts=rle["counts"].decode("ascii"))
    return dict(id=annotation_id, image_id=image_id, category_id=label + 1, bbox=bbox, area=int(mask.sum()),
                iscrowd=0, segmentation=segmentation)


def generate_scene(seed: int, split_id: int, index: int, size: int, num_classes: int):
    """Draws one scene and its instances, as the dataset stores them (before JPEG).

    Args:
      seed: dataset seed.
      split_id: 0 for train, 1 for val (different scenes, same distribution).
      index: scene index within the split.
      size: image side in pixels.
      num_classes: number of classes; each object's label is uniform over them.

    Returns:
      (uint8 [size, size, 3] image, list of (label, bool [size, size] visible mask)) in painting order,
      without the dropped instances (fewer than MIN_VISIBLE_PIXELS visible pixels).
    """
    image, labels, owner = draw_scene(seed, split_id, index, size, num_classes)
    return image, visible_instances(labels, owner)


def visible_instances(labels: list, owner: np.ndarray) -> list:
    """The instances of a scene that keep at least MIN_VISIBLE_PIXELS visible pixels.

    Args:
      labels: class label of each painted object, in painting order.
      owner: int [S, S], the index of the object each pixel shows (-1: background).

    Returns:
      list of (label, bool [S, S] visible mask), in painting order.
    """
    masks = [(label, owner == k) for k, label in enumerate(labels)]
    return [(label, mask) for label, mask in masks if mask.sum() >= MIN_VISIBLE_PIXELS]


def draw_scene(seed: int, split_id: int, index: int, size: int, num_classes: int):
    """Draws one scene: every painted object and which of them each pixel shows.

    Args:
      seed, split_id, index, size, num_classes: as in generate_scene.

    Returns:
      (uint8 [size, size, 3] image, list of the labels of all painted objects in painting order,
      int8 [size, size] owner map: the index of the object a pixel shows, -1 for background).
    """
    rng = np.random.default_rng([seed, SCENES_STREAM, split_id, index])
    canvas = shapes.background(rng, size)
    owner = np.full((size, size), -1, np.int8)
    labels = []
    for k in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        label = int(rng.integers(num_classes))
        radius = _radius(rng, size)
        shape, texture = synthetic.class_style(label)
        rows, cols, mask = synthetic.draw_object(canvas, rng, shape, texture, hue=rng.random(), radius=radius)
        owner[rows, cols][mask] = k  # later objects overwrite: the map holds what is visible
        labels.append(label)
    return synthetic.add_grain(canvas, rng), labels, owner


def _radius(rng: np.random.Generator, size: int) -> float:
    """An object radius, log-uniform in pixels, in draw_object's units (the image spans -1..1)."""
    pixels = np.exp(rng.uniform(np.log(MIN_RADIUS_PX), np.log(MAX_RADIUS * size)))
    return float(pixels * 2.0 / (size - 1))  # neighbouring pixel centres lie 2 / (size - 1) apart
