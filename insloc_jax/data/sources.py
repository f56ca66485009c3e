"""Image sources: a tfds dataset, a folder tree, a file list, or the embedded dataset.

Every source is opened from a plain dict by `open_source` and is indexable: image i (a stable integer, the
position in a fixed order: sorted paths, list order, or the tfds split order) is read on its own, so the
pipeline addresses samples through a stateless permutation and resumes anywhere in O(1). A `Source`
holds no open file or thread, so it pickles into the input pipeline's worker processes (a tfds source
pickles as its spec and opens its ArrayRecord files again, lazily, in each process). Encoded images are
decoded to uint8 RGB by `decode` (OpenCV; GIF through Pillow), which raises DecodeError for anything it
cannot decode completely, truncated files included.

Nothing here imports TensorFlow; tensorflow-datasets is imported only when a tfds source is opened, and
reads ArrayRecord files through `tfds.data_source` without TensorFlow.

Specs (`kind` selects the source; other keys as listed):
  {"kind": "synthetic", "data_dir": D, "split": "train"|"test", image_size, num_train, num_test,
   num_classes, seed}                      generated into D on first use (seconds; synthetic.py)
  {"kind": "tfds", "name": N, "split": S, "data_dir": D, "image_key": "image", "in_memory": False}
                                           a dataset prepared in ArrayRecord format; in_memory=True reads
                                           every encoded image into memory at open (and so into each
                                           worker process): only for sets of a few GB at most
  {"kind": "folder", "root": R}            every .jpg/.jpeg/.png/.bmp/.gif below R, sorted
  {"kind": "file_list", "list_file": F, "root": R}   lines "relative/path [label]", like train.txt

ImageNet through tfds (imagenet2012 cannot be downloaded automatically; preparing it needs TensorFlow,
reading it does not):
  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (and optionally the test tar) from
     https://image-net.org into one directory M, unchanged (do not extract).
  2. Install the preparation tools once: pip install -r requirements-tfds.txt (TensorFlow).
  3. Build the ArrayRecord copy once (hours; about 150 GB in D):
       tfds build imagenet2012 --data_dir=D --manual_dir=M --file_format=array_record
     or in python: tfds.builder("imagenet2012", data_dir=D, file_format="array_record")
       .download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=M)).
     A copy built earlier without --file_format (TFRecord files) cannot be read at random: rebuild it.
  4. Use {"kind": "tfds", "name": "imagenet2012", "split": "train", "data_dir": D}.
A missing dataset, directory or list raises SourceError with the steps to prepare it. Undecodable files are
skipped (and counted by the pipeline), never fatal.
"""
import io
import logging
import os
import threading
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# The spec fields each kind reads (configs carry all of them: `config.source_spec` keeps the kind's own).
SPEC_FIELDS = {
    "synthetic": ("data_dir", "split", "image_size", "num_train", "num_test", "num_classes", "seed"),
    "tfds": ("name", "split", "data_dir", "image_key", "in_memory"),
    "folder": ("root",),
    "file_list": ("list_file", "root"),
}
# Decoded as 3-channel RGB (gray and RGBA become RGB) without applying EXIF orientation, as TensorFlow's
# and Pillow's decoders do; OpenCV before 4.11 lacks IMREAD_COLOR_RGB and decodes to BGR.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_IMREAD = (cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB) | cv2.IMREAD_IGNORE_ORIENTATION


class SourceError(FileNotFoundError):
    """A dataset that is not there; the message says how to prepare it."""


class DecodeError(ValueError):
    """Bytes that are not a complete JPEG/PNG/BMP/GIF image."""


class Source:
    """An opened image source: random access to encoded images and their labels. Picklable.

    Attributes:
      name: human-readable description.
      num_examples: images in the source (all processes together); valid indices are 0 .. num_examples - 1.
    """
    name: str
    num_examples: int

    def read(self, index: int) -> bytes:
        """The encoded image `index` (raises OSError when a listed file cannot be read)."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        """The class label of image `index`, -1 if unknown."""
        raise NotImplementedError

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"{self.name}: index {index} is outside 0..{self.num_examples - 1}")
        return index

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, num_examples={self.num_examples})"


class _Packed:
    """Byte strings packed into one buffer with offsets: compact, and pickled as two arrays."""

    def __init__(self, items: Sequence[bytes]):
        lengths = np.fromiter((len(b) for b in items), np.int64, len(items))
        self.offsets = np.zeros(len(items) + 1, np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(items), np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes()


class FileSource(Source):
    """Image files below a root directory (folder, file list and the embedded dataset), labels in memory."""

    def __init__(self, name: str, root: str, relative_paths: Sequence[str], labels: Sequence[int]):
        self.name, self.root = name, root
        self.num_examples = len(relative_paths)
        self._paths = _Packed([os.fsencode(p) for p in relative_paths])
        self._labels = np.asarray(labels, np.int64)

    def path(self, index: int) -> str:
        """The file of image `index`."""
        return os.path.join(self.root, os.fsdecode(self._paths[self._check(index)]))

    def read(self, index: int) -> bytes:
        with open(self.path(index), "rb") as f:
            return f.read()

    def label(self, index: int) -> int:
        return int(self._labels[self._check(index)])


class MemorySource(Source):
    """Encoded images held in memory (a tfds split opened with in_memory=True)."""

    def __init__(self, name: str, images: Sequence[bytes], labels: Sequence[int]):
        self.name, self.num_examples = name, len(images)
        self._images = _Packed(images)
        self._labels = np.asarray(labels, np.int64)

    def read(self, index: int) -> bytes:
        return self._images[self._check(index)]

    def label(self, index: int) -> int:
        return int(self._labels[self._check(index)])


class TfdsSource(Source):
    """A tfds split in ArrayRecord format, read through `tfds.data_source` with the image left encoded.

    Pickles as its spec: each process opens the data source again on its first read.
    """

    def __init__(self, name: str, dataset: str, split: str, data_dir: Optional[str], image_key: str,
                 num_examples: int, has_label: bool, data=None):
        self.name, self.num_examples = name, num_examples
        self._spec = dict(name=dataset, split=split, data_dir=data_dir, image_key=image_key)
        self._has_label = has_label
        self._data, self._lock = data, threading.Lock()
        self._last = (-1, None)  # the latest record read: label(i) after read(i) reads it once

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_data=None, _lock=None, _last=(-1, None))
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _record(self, index: int) -> dict:
        index = self._check(index)
        last = self._last
        if last[0] == index:
            return last[1]
        if self._data is None:
            with self._lock:
                if self._data is None:
                    self._data = _tfds_data_source(**self._spec)
        record = self._data[index]
        self._last = (index, record)
        return record

    def read(self, index: int) -> bytes:
        return bytes(self._record(index)[self._spec["image_key"]])

    def label(self, index: int) -> int:
        return int(self._record(index)["label"]) if self._has_label else -1


def decode(data: bytes) -> np.ndarray:
    """Decodes a JPEG/PNG/BMP/GIF image (the first frame of an animation) to uint8 [H, W, 3] RGB.

    Gray and RGBA images become RGB (alpha is dropped); EXIF orientation is not applied.

    Raises:
      DecodeError: the bytes are not an image, or not a complete one (a truncated JPEG or PNG).
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    if data[:6] in (b"GIF87a", b"GIF89a"):  # OpenCV has no GIF decoder
        return _decode_with_pillow(data)
    if data[:2] == b"\xff\xd8" and not _jpeg_complete(data):
        # OpenCV before 5 returns a gray-filled partial image for a truncated JPEG, with only a warning.
        raise DecodeError("truncated JPEG: no end-of-image marker after the image data")
    image = None
    if data:
        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD)
        except cv2.error:
            image = None
    if image is None:
        return _decode_with_pillow(data)  # a format OpenCV lacks, else DecodeError
    if _IMREAD_RGB is None:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def _decode_with_pillow(data: bytes) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # raises for truncated data (ImageFile.LOAD_TRUNCATED_IMAGES is False)
            return np.asarray(image.convert("RGB"))
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DecodeError(f"not a decodable image ({len(data)} bytes: {err})") from err


def _jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG holds an end-of-image marker (FFD9) after the start of its first scan.

    The marker segments before the scan are walked by their lengths, so the FFD9 of an EXIF thumbnail
    does not count; inside the entropy-coded data FF is always followed by 00 or a restart marker, so an
    FFD9 there is the real end. Trailing bytes after the end marker are allowed. A header this walk cannot
    follow is left to the decoder (True).
    """
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:  # start of scan
            return data.rfind(b"\xff\xd9", pos) >= 0
        elif marker == 0xD9:  # end of image before any scan
            return False
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return False  # the data ends before the first scan


def examples(source: Source, start: int = 0, stop: Optional[int] = None) -> Iterator[dict]:
    """Decoded images in index order, for evaluation: {"image" uint8 [H, W, 3], "index" int, "label" int}.

    Undecodable or unreadable images are skipped, with one logged warning each.
    """
    stop = source.num_examples if stop is None else min(stop, source.num_examples)
    for index in range(start, stop):
        try:
            image = decode(source.read(index))
        except (DecodeError, OSError) as err:
            logging.warning("%s: skipping undecodable image %d (%s)", source.name, index, err)
            continue
        yield {"image": image, "index": index, "label": source.label(index)}


def open_source(spec: dict) -> Source:
    """Opens a source from its spec (see the module docstring).

    Raises:
      SourceError: the dataset, directory or list file is missing or empty.
      ValueError: an unknown kind, or fields the kind does not read.
    """
    spec = dict(spec)
    kind = spec.pop("kind")
    openers = {"synthetic": _open_synthetic, "tfds": _open_tfds, "folder": _open_folder,
               "file_list": _open_file_list}
    if kind not in openers:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {sorted(openers)}")
    unknown = sorted(set(spec) - set(SPEC_FIELDS[kind]))
    if unknown:
        raise ValueError(f"a {kind} source has no fields {unknown}; it reads {list(SPEC_FIELDS[kind])}")
    return openers[kind](**spec)


def _open_synthetic(data_dir: str, split: str = "train", **config) -> Source:
    from insloc_jax.data import synthetic

    if split not in synthetic.SPLIT_IDS:
        raise ValueError(f"the embedded dataset has splits {sorted(synthetic.SPLIT_IDS)}, not {split!r}")
    directory = synthetic.prepare(data_dir, **config)
    source = _open_file_list(os.path.join(directory, f"{split}.txt"), directory)
    source.name = f"synthetic:{os.path.basename(os.path.dirname(directory))}:{split}"
    return source


def _not_prepared(name: str, data_dir: Optional[str], reason: str) -> SourceError:
    manual = (" --manual_dir=DIR (the directory holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar)"
              if name.startswith("imagenet2012") else "")
    return SourceError(
        f"tfds dataset {name!r} {reason}. Prepare it once in ArrayRecord format with `tfds build {name} "
        f"--data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record{manual}`; preparing "
        "needs TensorFlow (`pip install -r requirements-tfds.txt`), reading it does not (see "
        "insloc_jax/data/sources.py).")


def _tfds_data_source(name: str, split: str, data_dir: Optional[str], image_key: str):
    """`tfds.data_source(name, split=split, data_dir=data_dir, download=False)` with the image left encoded."""
    import tensorflow_datasets as tfds

    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})


def _open_tfds(name: str, split: str = "train", data_dir: Optional[str] = None, image_key: str = "image",
               in_memory: bool = False) -> Source:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise _not_prepared(name, data_dir, f"is neither registered nor prepared in {data_dir!r}") from err
    if not builder.is_prepared():
        raise _not_prepared(name, data_dir, f"is not prepared in {builder.data_dir!r}")
    formats = builder.info.available_file_formats()
    if not formats & set(tfds.core.file_adapters.FileFormat.with_random_access()):
        found = ", ".join(sorted(f.value for f in formats)) or "an unknown format"
        raise _not_prepared(name, data_dir, f"is prepared in {builder.data_dir!r} as {found}, which cannot be "
                            "read at random (delete that copy or use another data_dir)")
    features = builder.info.features
    if image_key not in features:
        raise ValueError(f"tfds dataset {name!r} has no feature {image_key!r} (source.image_key); its "
                         f"features are {sorted(features)}")
    label = features["label"] if "label" in features else None
    has_label = (label is not None and tuple(label.shape) == ()
                 and np.issubdtype(np.dtype(label.np_dtype), np.integer))
    data = _tfds_data_source(name, split, data_dir, image_key)
    title = f"tfds:{name}:{split}"
    if not len(data):
        raise SourceError(f"{title} is empty")
    source = TfdsSource(title, name, split, data_dir, image_key, len(data), has_label, data=data)
    if not in_memory:
        return source
    images, labels = [], []
    for index in range(source.num_examples):
        images.append(source.read(index))
        labels.append(source.label(index))
    return MemorySource(title, images, labels)


def _open_folder(root: str) -> Source:
    if not os.path.isdir(root):
        raise SourceError(f"image folder {root!r} does not exist; point source.root at a directory tree of "
                          f"{'/'.join(IMAGE_EXTENSIONS)} files")
    paths = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, files in os.walk(root, followlinks=True) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise SourceError(f"image folder {root!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    return FileSource(f"folder:{root}", root, paths, [-1] * len(paths))


def _open_file_list(list_file: str, root: str) -> Source:
    if not os.path.isfile(list_file):
        raise SourceError(f"file list {list_file!r} does not exist; write one line per image, "
                          "'relative/path.JPEG [label]', relative to source.root")
    if not os.path.isdir(root):
        raise SourceError(f"image root {root!r} of file list {list_file!r} does not exist")
    paths, labels = [], []
    with open(list_file) as f:
        for line in f:
            fields = line.split()
            if fields:
                paths.append(fields[0])
                labels.append(int(fields[1]) if len(fields) > 1 and fields[1].lstrip("-").isdigit() else -1)
    if not paths:
        raise SourceError(f"file list {list_file!r} is empty")
    return FileSource(f"file_list:{list_file}", root, paths, labels)
