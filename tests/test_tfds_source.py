"""The tfds source on tiny datasets prepared here: ArrayRecord read without TensorFlow, and the errors.

Preparing a TFDS dataset needs TensorFlow (requirements-tfds.txt), so this file is skipped where it is not
installed; reading the prepared ArrayRecord files does not need it, which one test checks in a process where
`import tensorflow` fails.
"""
import io
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow", reason="preparing a TFDS dataset needs TensorFlow "
                                         "(pip install -r requirements-tfds.txt); reading one does not")
import tensorflow_datasets as tfds  # noqa: E402

from insloc_jax.data import sources  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _encoded(array, fmt, **options):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _images():
    """label -> (encoded bytes, expected decode or None if undecodable, exact?); each label used once."""
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (9 + 3 * k, 14 - k, 3), dtype=np.uint8) for k in range(3)]
    smooth = np.clip(np.mgrid[:24, :32][1][..., None] * np.array([6, 3, 1]) + 20, 0, 255).astype(np.uint8)
    return {
        0: (_encoded(rgb[0], "PNG"), rgb[0], True),
        1: (_encoded(rgb[1][..., 0], "PNG"), np.repeat(rgb[1][..., :1], 3, axis=-1), True),  # gray
        2: (_encoded(smooth, "JPEG", quality=95), smooth, False),
        3: (b"\xff\xd8\xff\xe0 not really a JPEG", None, False),  # corrupt: the Image feature keeps raw bytes
        4: (_encoded(rgb[2], "PNG"), rgb[2], True),
    }


class InslocTinyImages(tfds.core.GeneratorBasedBuilder):
    """Five images with unique labels (so a record says which image it is), one of them corrupt."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=5)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for label, (data, _, _) in _images().items():
            yield label, {"image": data, "label": label}


class InslocTinyPictures(tfds.core.GeneratorBasedBuilder):
    """Two unlabelled images under another feature name."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=(None, None, 3)), "id": np.int64}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(2):
            yield i, {"picture": _encoded(np.full((5, 6, 3), 50 * i, np.uint8), "PNG"), "id": i}


@pytest.fixture(scope="module")
def array_record_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds_array_record"))
    for builder in (InslocTinyImages, InslocTinyPictures):
        builder(data_dir=data_dir).download_and_prepare(file_format="array_record")
    return data_dir


def _spec(data_dir, **kwargs):
    return {"kind": "tfds", "name": "insloc_tiny_images", "split": "train", "data_dir": data_dir, **kwargs}


def _check_contents(src):
    expected = _images()
    assert src.num_examples == len(expected)
    labels = [src.label(i) for i in range(src.num_examples)]
    assert sorted(labels) == sorted(expected)
    for i, label in enumerate(labels):
        data, array, exact = expected[label]
        assert src.read(i) == data  # the stored bytes, not decoded by tfds
        if array is None:
            with pytest.raises(sources.DecodeError):
                sources.decode(src.read(i))
            continue
        got = sources.decode(src.read(i))
        assert got.shape == array.shape and got.dtype == np.uint8
        if exact:
            np.testing.assert_array_equal(got, array)
        else:
            assert np.abs(got.astype(int) - array).mean() < 2


def test_tfds_source_reads_encoded_images_and_labels(array_record_dir, caplog):
    src = sources.open_source(_spec(array_record_dir))
    assert isinstance(src, sources.TfdsSource) and src.name == "tfds:insloc_tiny_images:train"
    _check_contents(src)
    with caplog.at_level(logging.WARNING):
        got = list(sources.examples(src))
    corrupt = [i for i in range(src.num_examples) if src.label(i) == 3]
    assert [e["index"] for e in got] == [i for i in range(src.num_examples) if i not in corrupt]
    assert all(e["label"] == src.label(e["index"]) for e in got)
    assert sum("undecodable" in r.getMessage() for r in caplog.records) == 1


def test_tfds_source_pickles_as_its_spec(array_record_dir):
    src = sources.open_source(_spec(array_record_dir))
    blob = pickle.dumps(src)
    assert len(blob) < 2000  # no records, no open files: each worker opens the data source itself
    copy = pickle.loads(blob)
    assert copy.num_examples == src.num_examples and copy.name == src.name
    _check_contents(copy)


def test_tfds_source_in_memory_holds_the_same_records(array_record_dir):
    lazy = sources.open_source(_spec(array_record_dir))
    held = sources.open_source(_spec(array_record_dir, in_memory=True))
    assert isinstance(held, sources.MemorySource) and held.num_examples == lazy.num_examples
    copy = pickle.loads(pickle.dumps(held))
    for i in range(lazy.num_examples):
        assert held.read(i) == lazy.read(i) == copy.read(i)
        assert held.label(i) == lazy.label(i) == copy.label(i)


def test_tfds_source_other_image_key_without_labels_and_split_slices(array_record_dir):
    src = sources.open_source({"kind": "tfds", "name": "insloc_tiny_pictures", "split": "train",
                               "data_dir": array_record_dir, "image_key": "picture"})
    assert src.num_examples == 2 and [src.label(i) for i in range(2)] == [-1, -1]
    assert sorted(int(sources.decode(src.read(i))[0, 0, 0]) for i in range(2)) == [0, 50]
    with pytest.raises(ValueError, match="no feature 'image'"):
        sources.open_source({"kind": "tfds", "name": "insloc_tiny_pictures", "data_dir": array_record_dir})
    part = sources.open_source(_spec(array_record_dir, split="train[1:3]"))
    whole = sources.open_source(_spec(array_record_dir))
    assert part.num_examples == 2 and [part.read(i) for i in range(2)] == [whole.read(i) for i in (1, 2)]


def test_tfds_source_reads_without_tensorflow(array_record_dir, tmp_path):
    # As in a Grain worker of a run without TensorFlow: the unpickled source, and a fresh open_source (the
    # builder class is not defined there, so tfds reads the dataset's description from its directory).
    blocker = tmp_path / "no_tf" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('TensorFlow is not installed here (test)')\n")
    src = sources.open_source(_spec(array_record_dir))
    (tmp_path / "source.pkl").write_bytes(pickle.dumps(src))
    code = f"""
import pickle, sys
from insloc_jax.data import sources
for src in (pickle.load(open({str(tmp_path / "source.pkl")!r}, "rb")),
            sources.open_source({_spec(array_record_dir)!r})):
    print([(src.label(i), len(src.read(i))) for i in range(src.num_examples)])
assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), ROOT]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = str([(src.label(i), len(src.read(i))) for i in range(src.num_examples)])
    assert done.stdout.split("\n")[:2] == [expected, expected]


def test_tfds_dataset_prepared_as_tfrecord_says_how_to_rebuild_it(tmp_path):
    data_dir = str(tmp_path / "tfrecord")
    InslocTinyImages(data_dir=data_dir).download_and_prepare()  # the default format: TFRecord
    with pytest.raises(sources.SourceError) as info:
        sources.open_source(_spec(data_dir))
    message = str(info.value)
    assert "tfrecord" in message and "cannot be read at random" in message
    assert f"tfds build insloc_tiny_images --data_dir={data_dir} --file_format=array_record" in message
    assert "requirements-tfds.txt" in message and "manual_dir" not in message


@pytest.mark.parametrize("name,words", [
    ("insloc_tiny_images", "is not prepared in"),  # registered here, never built in this data_dir
    ("insloc_no_such_dataset", "is neither registered nor prepared"),
])
def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path, name, words):
    data_dir = str(tmp_path / "empty")
    with pytest.raises(sources.SourceError, match=words) as info:
        sources.open_source(_spec(data_dir, name=name))
    assert f"tfds build {name} --data_dir={data_dir} --file_format=array_record" in str(info.value)
    assert "TensorFlow" in str(info.value)
