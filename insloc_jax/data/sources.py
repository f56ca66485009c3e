"""Image sources: a tfds dataset, a folder tree, a file list, or the embedded dataset.

Every source is opened from a plain dict by `open_source` and yields encoded images with a stable integer
index (the position in a fixed order: sorted paths, list order, or the tfds split order), decoded to uint8
RGB by `decode`. Two access patterns exist:
  * indexable (folder, file list, embedded set, any tfds set with in_memory=True): `read(index)` fetches
    one image, so the pipeline can address samples by a stateless permutation and resume in O(1);
  * streamed (large tfds sets such as ImageNet): `records(start, stop)` reads a contiguous range of the
    split in order; the pipeline shuffles it with a buffer.

Specs (`kind` selects the source; other keys as listed):
  {"kind": "synthetic", "data_dir": D, "split": "train"|"test", image_size, num_train, num_test,
   num_classes, seed}                      generated into D on first use (seconds)
  {"kind": "tfds", "name": N, "split": S, "data_dir": D, "image_key": "image", "in_memory": False}
                                           in_memory=True holds the encoded split in one tensor:
                                           only for sets well under 2 GB (a graph constant limit)
  {"kind": "folder", "root": R}            every .jpg/.jpeg/.png/.bmp/.gif below R, sorted
  {"kind": "file_list", "list_file": F, "root": R}   lines "relative/path [label]", like train.txt

ImageNet through tfds (imagenet2012 cannot be downloaded automatically):
  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (and optionally the test tar) from
     https://image-net.org into one directory M, unchanged (do not extract).
  2. Build the TFDS copy once (hours; about 150 GB in D):
       tfds build imagenet2012 --data_dir=D --manual_dir=M
     or in python: tfds.builder("imagenet2012", data_dir=D).download_and_prepare(
       download_config=tfds.download.DownloadConfig(manual_dir=M)).
  3. Use {"kind": "tfds", "name": "imagenet2012", "split": "train", "data_dir": D}.
A missing dataset, directory or list raises SourceError with the steps to prepare it. Undecodable files are
skipped and counted by the pipeline, never fatal.
"""
import dataclasses
import os
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# The spec fields each kind reads (configs carry all of them: `config.source_spec` keeps the kind's own).
SPEC_FIELDS = {
    "synthetic": ("data_dir", "split", "image_size", "num_train", "num_test", "num_classes", "seed"),
    "tfds": ("name", "split", "data_dir", "image_key", "in_memory"),
    "folder": ("root",),
    "file_list": ("list_file", "root"),
}
IN_MEMORY_BATCH = 1024


class SourceError(FileNotFoundError):
    """A dataset that is not there; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class Source:
    """An opened image source.

    Attributes:
      name: human-readable description.
      num_examples: images in the source (all processes together).
      table: string [N] tensor of file paths (holds_paths) or encoded images; None for streamed sources.
      holds_paths: whether table holds paths to read.
      labels: int64 [N] tensor of labels (-1 if unknown); None for streamed sources.
      stream: for streamed sources, (start, stop) -> tf.data of {"bytes", "index", "label"} in split order.
    """
    name: str
    num_examples: int
    table: Optional[tf.Tensor] = None
    holds_paths: bool = False
    labels: Optional[tf.Tensor] = None
    stream: Optional[Callable[[int, int], tf.data.Dataset]] = None

    @property
    def indexable(self) -> bool:
        return self.table is not None

    def read(self, index):
        """Encoded image (string scalar) of int64 scalar `index`; indexable sources only."""
        value = tf.gather(self.table, index)
        return tf.io.read_file(value) if self.holds_paths else value

    def records(self, start: int = 0, stop: Optional[int] = None) -> tf.data.Dataset:
        """Encoded images with index and label for indices [start, stop), in index order."""
        stop = self.num_examples if stop is None else stop
        if not self.indexable:
            return self.stream(start, stop)
        return tf.data.Dataset.range(start, stop).map(
            lambda i: {"bytes": self.read(i), "index": i, "label": tf.gather(self.labels, i)})


def decode(encoded) -> tf.Tensor:
    """Decodes a JPEG/PNG/BMP/GIF string to uint8 [H, W, 3] (gray and RGBA become RGB)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def examples(source: Source, start: int = 0, stop: Optional[int] = None) -> tf.data.Dataset:
    """Decoded images in index order, for evaluation: {"image" uint8 [H, W, 3], "index", "label"}.

    Undecodable images are dropped (tf.data logs each one).
    """
    ds = source.records(start, stop).map(
        lambda r: {"image": decode(r["bytes"]), "index": r["index"], "label": r["label"]},
        num_parallel_calls=tf.data.AUTOTUNE)
    return ds.ignore_errors(log_warning=True)


def open_source(spec: dict) -> Source:
    """Opens a source from its spec (see the module docstring).

    Raises:
      SourceError: the dataset, directory or list file is missing or empty.
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
    from insloc_jax.data import synthetic  # the builder registers itself on import
    builder = synthetic.prepare(data_dir, **config)
    return _tfds_in_memory(builder, split, "image", f"synthetic:{builder.builder_config.name}:{split}")


def _open_tfds(name: str, split: str = "train", data_dir: Optional[str] = None, image_key: str = "image",
               in_memory: bool = False) -> Source:
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except AssertionError as err:
        raise SourceError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir!r}. Prepare it once with "
            f"`tfds build {name} --data_dir={data_dir or '~/tensorflow_datasets'}` (for imagenet2012 add "
            "--manual_dir=DIR holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; see "
            "insloc_jax/data/sources.py).") from err
    if in_memory:
        return _tfds_in_memory(builder, split, image_key, f"tfds:{name}:{split}")
    return _tfds_streamed(builder, split, image_key, f"tfds:{name}:{split}")


def _tfds_read(builder, split: str, image_key: str) -> tf.data.Dataset:
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: (ex[image_key], ex.get("label", tf.constant(-1, tf.int64))))


def _split_size(builder, split: str, image_key: str) -> int:
    """Examples in split, from the metadata, else counted (mocked builders have no split metadata)."""
    if split in builder.info.splits:
        return int(builder.info.splits[split].num_examples)
    return int(_tfds_read(builder, split, image_key).reduce(0, lambda n, _: n + 1))


def _tfds_in_memory(builder, split: str, image_key: str, name: str) -> Source:
    encoded, labels = [], []
    for images, label in _tfds_read(builder, split, image_key).batch(IN_MEMORY_BATCH).as_numpy_iterator():
        encoded.append(images)
        labels.append(label)
    if not encoded:
        raise SourceError(f"{name} is empty")
    encoded, labels = np.concatenate(encoded), np.concatenate(labels).astype(np.int64)
    return Source(name, len(encoded), table=tf.constant(encoded), labels=tf.constant(labels))


def _tfds_streamed(builder, split: str, image_key: str, name: str) -> Source:
    def stream(start: int, stop: int) -> tf.data.Dataset:
        # Slicing by absolute indices keeps the tfds order, so index = start + position is stable.
        sub = f"{split}[{start}:{stop}]" if split in builder.info.splits else split
        ds = _tfds_read(builder, sub, image_key).enumerate(start)
        return ds.map(lambda i, ex: {"bytes": ex[0], "index": i, "label": ex[1]})
    return Source(name, _split_size(builder, split, image_key), stream=stream)


def _open_folder(root: str) -> Source:
    if not os.path.isdir(root):
        raise SourceError(f"image folder {root!r} does not exist; point source.root at a directory tree of "
                          f"{'/'.join(IMAGE_EXTENSIONS)} files")
    paths = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, files in os.walk(root, followlinks=True) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise SourceError(f"image folder {root!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    return _path_source(f"folder:{root}", root, paths, [-1] * len(paths))


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
    return _path_source(f"file_list:{list_file}", root, paths, labels)


def _path_source(name: str, root: str, relative_paths, labels) -> Source:
    full = [os.path.join(root, p) for p in relative_paths]
    return Source(name, len(full), table=tf.constant(full), holds_paths=True,
                  labels=tf.constant(np.asarray(labels, np.int64)))
