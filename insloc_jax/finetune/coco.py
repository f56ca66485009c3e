"""Any COCO-format instance dataset, read for Mask R-CNN fine-tuning: the split, one example, the batches.

A split is an image directory and its instances JSON (`config.data.{train,val}_images` and
`..._annotations`). `load_split` parses the JSON once into plain records (images sorted by id, so image
`index` is stable whatever the JSON's order) and the label map: category id -> 1..K in sorted id order,
0 being the background. `read_example` decodes one image and builds its training target in numpy (the
training loop converts to tensors): boxes `boxes_xyxy` float32 [N, 4] in pixels, contiguous labels int64
[N] and masks uint8 [N, H, W], decoded with pycocotools from polygons or from compressed or uncompressed
RLE. Crowd regions, boxes under a pixel wide or high and annotations without a usable mask are not
training targets; evaluation reads every annotation from the JSON itself (coco_eval.py).

Batches are epoch-free: iteration t's images and flips are drawn from
np.random.default_rng([seed, purpose, t]) alone, so a run resumed at t draws exactly what an uninterrupted
one would. Only images with at least one training annotation are sampled (`Split.train_indices`).

A missing directory or JSON raises MissingDataError (a FileNotFoundError), a JSON that is not a COCO
instances file raises CocoFormatError (a ValueError), both DataErrors naming the config field to set. An
image that cannot be read or decoded, or whose annotations cannot be decoded, is skipped: `read_example`
returns None with one warning, and the caller counts it. `Split.coco` is the JSON as pycocotools' COCO
object, the ground truth of evaluation (coco_eval.py).
"""
import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from insloc_jax.data import seeds, sources

# Purposes of the fine-tuning draws, apart from the pretraining pipeline's (data/seeds.py: 1..5) and the
# probes' (eval/data.py: 100+), so no two kinds of decision share a stream.
BATCH = 200  # which images make iteration t's batch
FLIP = 201  # which of them are mirrored


class DataError(Exception):
    """A dataset that cannot be used for fine-tuning; the message says what to set or fix."""


class MissingDataError(DataError, sources.SourceError):
    """A split's image directory, annotations file or images are not there (a FileNotFoundError)."""


class CocoFormatError(DataError, ValueError):
    """An annotations file that is not a COCO instances file, or an annotation that cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image of a split as the JSON describes it.

    Attributes:
      image_id: the JSON's image id.
      file_name: the image file, relative to the split's image directory.
      height, width: the image size the annotations refer to.
      annotations: every annotation of the image (crowd regions included), in JSON order.
    """
    image_id: int
    file_name: str
    height: int
    width: int
    annotations: Tuple[dict, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A parsed COCO instances split.

    Attributes:
      name: "train" or "val": names the config fields in error messages.
      image_dir: the directory the images' file names are relative to.
      annotations_json: the instances JSON.
      images: the images sorted by image id; an image's index is its position here.
      category_ids: the category ids in sorted order; label k (1..K) is category_ids[k - 1].
      category_names: the categories' names, in the same order.
      train_indices: int64 [M], the indices of the images with at least one training annotation.
    """
    name: str
    image_dir: str
    annotations_json: str
    images: Tuple[ImageRecord, ...]
    category_ids: Tuple[int, ...]
    category_names: Tuple[str, ...]
    train_indices: np.ndarray

    @property
    def category_to_label(self) -> Dict[int, int]:
        """{category id: contiguous label 1..K}."""
        return {c: k + 1 for k, c in enumerate(self.category_ids)}

    @property
    def label_to_category(self) -> Dict[int, int]:
        """{contiguous label 1..K: category id}, for writing results (coco_eval.to_results)."""
        return {k + 1: c for k, c in enumerate(self.category_ids)}

    @functools.cached_property
    def coco(self) -> COCO:
        """The JSON as pycocotools' COCO object, the ground truth of coco_eval.evaluate; read on first use
        (evaluation only), so a split that is only trained on never holds it."""
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
            return COCO(self.annotations_json)


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One decoded training image and its target, in numpy.

    Attributes:
      image: uint8 [H, W, 3] RGB.
      boxes: float32 [N, 4] boxes_xyxy (x0, y0, x1, y1) in pixels, clipped to the image (the name of
        torchvision's target key).
      labels: int64 [N] contiguous labels 1..K.
      masks: uint8 [N, H, W] instance masks (0 / 1).
      image_id: the JSON's image id.
      index: the image's index in the split.
      flipped: whether image, boxes and masks were mirrored horizontally.
    """
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    image_id: int
    index: int
    flipped: bool = False


def _field(name: str, kind: str) -> str:
    return f"--config.data.{name}_{kind}"


def _check_paths(image_dir: str, annotations_json: str, name: str) -> None:
    if not annotations_json or not os.path.isfile(annotations_json):
        raise MissingDataError(
            f"COCO annotations file {annotations_json!r} of the {name} split does not exist; set "
            f"{_field(name, 'annotations')}=PATH to its instances JSON (e.g. instances_{name}2017.json)")
    if not image_dir or not os.path.isdir(image_dir):
        raise MissingDataError(
            f"COCO image directory {image_dir!r} of the {name} split does not exist; set "
            f"{_field(name, 'images')}=DIR to the directory holding the file names of {annotations_json}")


def _read_json(path: str, name: str) -> dict:
    """The JSON's top-level dict, checked to hold the three lists of an instances file."""
    fix = f"set {_field(name, 'annotations')} to a COCO instances file"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoFormatError(f"{path} is not JSON ({err}); {fix}") from err
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise CocoFormatError(f"{path} is not a COCO instances file: it has no {missing} list(s); {fix}")
    if not data["images"] or not data["categories"]:
        raise CocoFormatError(f"{path} lists no images or no categories; {fix}")
    bad = next((a for a in data["annotations"] if not _is_instance(a)), None)
    if bad is not None:
        raise CocoFormatError(f"{path} is not a COCO instances file: annotation {str(bad)[:200]} lacks "
                              f"image_id, category_id or a 4-number bbox; {fix}")
    return data


def _is_instance(annotation) -> bool:
    if not isinstance(annotation, dict) or "image_id" not in annotation or "category_id" not in annotation:
        return False
    bbox = annotation.get("bbox")
    return isinstance(bbox, (list, tuple)) and len(bbox) == 4


def _categories(data: dict, path: str) -> Tuple[Tuple[int, ...], Tuple[str, ...]]:
    """(sorted category ids, their names)."""
    by_id = {}
    for category in data["categories"]:
        category_id = int(category["id"])
        if category_id in by_id:
            raise CocoFormatError(f"{path} lists category id {category_id} twice")
        by_id[category_id] = str(category.get("name", category_id))
    ids = tuple(sorted(by_id))
    return ids, tuple(by_id[i] for i in ids)


def _images(data: dict, path: str, category_ids: Sequence[int]) -> Tuple[ImageRecord, ...]:
    """The image records sorted by id, each with its annotations, every reference checked."""
    known = set(category_ids)
    grouped = {int(image["id"]): [] for image in data["images"]}
    if len(grouped) != len(data["images"]):
        raise CocoFormatError(f"{path} lists an image id more than once")
    for annotation in data["annotations"]:
        if annotation["category_id"] not in known:
            raise CocoFormatError(f"{path}: annotation {annotation.get('id')} has category_id "
                                  f"{annotation['category_id']}, which is not in its categories")
        if annotation["image_id"] not in grouped:
            raise CocoFormatError(f"{path}: annotation {annotation.get('id')} refers to image "
                                  f"{annotation['image_id']}, which is not in its images")
        grouped[annotation["image_id"]].append(annotation)
    records = [ImageRecord(int(i["id"]), str(i["file_name"]), int(i["height"]), int(i["width"]),
                           tuple(grouped[int(i["id"])])) for i in data["images"]]
    return tuple(sorted(records, key=lambda r: r.image_id))


def _parse(data: dict, path: str, name: str):
    """(category ids, category names, image records), any malformed entry raised as CocoFormatError."""
    try:
        category_ids, category_names = _categories(data, path)
        return category_ids, category_names, _images(data, path, category_ids)
    except CocoFormatError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise CocoFormatError(f"{path}: an image or category entry lacks a field or has a wrong type "
                              f"({type(err).__name__}: {err}); set {_field(name, 'annotations')} to a COCO "
                              "instances file") from err


def _usable_polygons(segmentation: list) -> list:
    # A polygon needs 3 points; pycocotools also reads a 4-number list as a box, not a polygon.
    return [p for p in segmentation if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]


def _has_mask(segmentation) -> bool:
    if isinstance(segmentation, list):
        return bool(_usable_polygons(segmentation))
    return isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation


def _clipped_box(bbox: Sequence[float], height: int, width: int) -> Tuple[float, float, float, float]:
    """COCO's (x, y, w, h) as (x0, y0, x1, y1), clipped to the image (boxes may overhang by a rounding)."""
    x, y, w, h = (float(v) for v in bbox)
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


def is_training_annotation(annotation: dict, height: int, width: int) -> bool:
    """Whether an annotation is a training target: not a crowd region, a box at least a pixel wide and
    high inside the image, and a polygon or RLE mask."""
    if annotation.get("iscrowd", 0):
        return False
    x0, y0, x1, y1 = _clipped_box(annotation["bbox"], height, width)
    return x1 - x0 >= 1 and y1 - y0 >= 1 and _has_mask(annotation.get("segmentation"))


def training_annotations(record: ImageRecord) -> Tuple[dict, ...]:
    """The image's training annotations, in JSON order."""
    return tuple(a for a in record.annotations if is_training_annotation(a, record.height, record.width))


def _log_untrained(split: Split) -> None:
    trained = set(split.train_indices.tolist())
    ids = [r.image_id for i, r in enumerate(split.images) if i not in trained]
    if ids:
        logging.info("%s: %d of %d images have no training annotation (unannotated, crowd-only or "
                     "degenerate) and are not sampled for training; image ids %s%s", split.annotations_json,
                     len(ids), len(split.images), ids[:20], " ..." if len(ids) > 20 else "")


def load_split(image_dir: str, annotations_json: str, name: str = "train") -> Split:
    """Parses a COCO instances split.

    Args:
      image_dir: the directory its images' `file_name`s are relative to.
      annotations_json: its instances JSON.
      name: "train" or "val", the config fields (`--config.data.{name}_images`, ...) errors name.

    Returns:
      The Split: images sorted by id with their annotations, the label map and the training images.

    Raises:
      MissingDataError: the directory, the JSON or the first listed image is missing.
      CocoFormatError: the JSON is not a COCO instances file (or refers to unknown images / categories).
    """
    _check_paths(image_dir, annotations_json, name)
    category_ids, category_names, images = _parse(_read_json(annotations_json, name), annotations_json, name)
    first = os.path.join(image_dir, images[0].file_name)
    if not os.path.isfile(first):
        raise MissingDataError(
            f"{first} (image {images[0].image_id} of {annotations_json}) does not exist; set "
            f"{_field(name, 'images')}=DIR to the directory holding that JSON's file names")
    train = np.array([i for i, r in enumerate(images) if training_annotations(r)], np.int64)
    split = Split(name, image_dir, annotations_json, images, category_ids, category_names, train)
    _log_untrained(split)
    return split


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """One annotation's mask from polygons, uncompressed RLE (counts a list) or compressed RLE.

    Args:
      segmentation: the annotation's `segmentation` field.
      height, width: the image size.

    Returns:
      uint8 [height, width] of 0 / 1 (several polygons are merged into one mask).

    Raises:
      CocoFormatError: no polygon of 3 points, an RLE of another size, or an unknown format.
    """
    if isinstance(segmentation, list):
        polygons = _usable_polygons(segmentation)
        if not polygons:
            raise CocoFormatError("a polygon segmentation without any polygon of 3 or more points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif _has_mask(segmentation):
        if [int(s) for s in segmentation["size"]] != [height, width]:
            raise CocoFormatError(f"an RLE of size {segmentation['size']} on a {height}x{width} image")
        compressed = not isinstance(segmentation["counts"], list)
        rle = segmentation if compressed else mask_utils.frPyObjects(segmentation, height, width)
    else:
        raise CocoFormatError(f"a segmentation that is neither polygons nor RLE: {str(segmentation)[:100]}")
    return np.ascontiguousarray(mask_utils.decode(rle))  # pycocotools returns Fortran order


def read_image(split: Split, index: int) -> Optional[np.ndarray]:
    """Image `index` decoded to uint8 [H, W, 3] RGB, or None (with a warning) if it cannot be.

    An image that is not the size its annotations give counts as unreadable: its masks would not fit.
    """
    record = split.images[index]
    path = os.path.join(split.image_dir, record.file_name)
    try:
        with open(path, "rb") as f:
            image = sources.decode(f.read())
    except (OSError, sources.DecodeError) as err:
        logging.warning("%s: skipping image %d (%s): %s", split.name, record.image_id, path, err)
        return None
    if image.shape[:2] != (record.height, record.width):
        logging.warning("%s: skipping image %d (%s): it is %dx%d, its annotations say %dx%d", split.name,
                        record.image_id, path, image.shape[0], image.shape[1], record.height, record.width)
        return None
    return image


def flip_example(example: Example) -> Example:
    """The example mirrored horizontally: x -> W - x for the image, the masks and the boxes."""
    width = example.image.shape[1]
    x0, y0, x1, y1 = np.moveaxis(example.boxes, -1, 0)
    boxes = np.stack([width - x1, y0, width - x0, y1], axis=-1).astype(np.float32)  # [N, 4]
    return dataclasses.replace(
        example, image=np.ascontiguousarray(example.image[:, ::-1]), boxes=boxes,
        masks=np.ascontiguousarray(example.masks[:, :, ::-1]), flipped=not example.flipped)


def read_example(split: Split, index: int, flip: bool) -> Optional[Example]:
    """Image `index` and its training target, or None (with a warning) if either cannot be decoded.

    Args:
      split: from load_split.
      index: the image's index in split.images.
      flip: mirror image, boxes and masks horizontally.

    Returns:
      The Example (N may be 0 for an image without training annotations), or None: skip and count it.
    """
    image = read_image(split, index)
    if image is None:
        return None
    record = split.images[index]
    h, w = record.height, record.width
    annotations = training_annotations(record)
    try:
        masks = [decode_mask(a["segmentation"], h, w) for a in annotations]
    except (CocoFormatError, TypeError, ValueError) as err:  # pycocotools raises the latter two on bad counts
        logging.warning("%s: skipping image %d: an annotation cannot be decoded (%s)", split.name,
                        record.image_id, err)
        return None
    labels = split.category_to_label
    example = Example(
        image=image,
        boxes=np.array([_clipped_box(a["bbox"], h, w) for a in annotations], np.float32).reshape(-1, 4),
        labels=np.array([labels[a["category_id"]] for a in annotations], np.int64),
        masks=np.stack(masks) if masks else np.zeros((0, h, w), np.uint8),  # [N, H, W]
        image_id=record.image_id, index=int(index))
    return flip_example(example) if flip else example


def num_images(split: Split) -> int:
    """How many images the split has (training and evaluation alike)."""
    return len(split.images)


def num_classes(split: Split) -> int:
    """K, the split's categories; the detector has K + 1 classes with the background."""
    return len(split.category_ids)


def image_id(split: Split, index: int) -> int:
    """The JSON's id of image `index`."""
    return split.images[index].image_id


def batch_indices(images: Union[int, Split], batch: int, seed: int, iteration: int) -> np.ndarray:
    """Iteration `iteration`'s batch, a function of (seed, iteration) alone.

    Args:
      images: a Split: its training images (train_indices) are sampled; or a number of images M: positions
        0..M - 1 are.
      batch: images per iteration.
      seed: config.seed.
      iteration: the training iteration (0-based).

    Returns:
      int64 [batch]: indices into split.images (given a Split) or positions (given M); distinct unless
      batch exceeds the images sampled from.
    """
    pool = images.train_indices if isinstance(images, Split) else np.arange(int(images), dtype=np.int64)
    if len(pool) < 1:
        raise DataError("no images to sample a training batch from: no image of the split has a training "
                        "annotation (a non-crowd instance with a box and a mask)")
    rng = seeds.rng(seed, BATCH, iteration)
    return pool[rng.choice(len(pool), size=batch, replace=batch > len(pool))]


def flip_draws(batch: int, seed: int, iteration: int) -> np.ndarray:
    """Which images of iteration `iteration`'s batch are mirrored: bool [batch], each with probability 1/2."""
    return seeds.rng(seed, FLIP, iteration).random(batch) < 0.5
