"""Sources: folder, file list, the embedded dataset; decoding, corrupt files and missing data.

The tfds source has its own file (tests/test_tfds_source.py); the last tests go through the batch pipeline,
which replaces and counts the files these sources cannot decode.
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

from insloc_jax.data import pipeline, sources, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PIPE = dict(per_device_batch=2, local_devices=2, canvas_size=64, fg_size_range=(24, 48), stream_group=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny image tree: 4 good images (JPEG, PNG, gray JPEG), one garbage file, one truncated JPEG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    arrays = {}
    for name in ("a/x1.jpg", "a/x2.JPEG", "b/y1.png", "b/c/z1.jpg"):
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        yy, xx = np.mgrid[:30 + len(arrays) * 7, :40]
        array = np.clip(rng.uniform(1, 3, 3) * (xx + yy)[..., None] + rng.uniform(0, 60, 3), 0, 255)
        array = array.astype(np.uint8)
        image = Image.fromarray(array).convert("L") if name.startswith("b/c") else Image.fromarray(array)
        image.save(root / name, quality=95) if name.lower().endswith((".jpg", ".jpeg")) else image.save(
            root / name)
        arrays[name] = np.asarray(Image.open(root / name).convert("RGB"))  # PIL's decode is the reference
    (root / "a" / "broken.jpg").write_bytes(b"this is not an image")
    good = (root / "a" / "x1.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(good[:len(good) // 3])
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root, arrays


def _decoded(source):
    return {e["index"]: e["image"] for e in sources.examples(source)}


def _encoded(array, fmt, **options):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _photo(h=60, w=80, seed=0):
    """A smooth colour image with some noise (JPEG-friendly, not flat)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    base = rng.uniform(0.5, 3, 3) * (xx + yy)[..., None] + rng.uniform(0, 60, 3)
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def test_folder_lists_sorted_images_and_decodes_good_ones(folder):
    root, arrays = folder
    src = sources.open_source({"kind": "folder", "root": str(root)})
    paths = [os.path.relpath(src.path(i), root) for i in range(src.num_examples)]
    assert paths == sorted(list(arrays) + ["a/broken.jpg", "b/truncated.jpg"])
    decoded = _decoded(src)
    assert sorted(decoded) == [paths.index(n) for n in sorted(arrays)]
    for name, array in arrays.items():
        got = decoded[paths.index(name)]
        assert got.shape == array.shape and got.dtype == np.uint8
        err = np.abs(got.astype(int) - array)
        if name.endswith(".png"):
            assert err.max() == 0
        else:  # JPEG decoders may differ slightly in chroma upsampling
            assert err.mean() < 1.5 and err.max() <= 12
    assert all(src.label(i) == -1 for i in range(src.num_examples))


def test_examples_skip_undecodable_images_with_one_warning_each(folder, caplog):
    root, _ = folder
    src = sources.open_source({"kind": "folder", "root": str(root)})
    with caplog.at_level(logging.WARNING):
        got = list(sources.examples(src))
    assert [e["index"] for e in got] == sorted(e["index"] for e in got) and len(got) == 4
    warnings = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    assert [e["index"] for e in sources.examples(src, 1, 3)] == [i for i in (1, 2) if i in _decoded(src)]


def test_file_list_labels_and_missing_and_corrupt_entries(folder, tmp_path):
    root, arrays = folder
    listing = tmp_path / "train.txt"
    listing.write_text("a/x1.jpg 3\nb/y1.png 5\na/broken.jpg 1\nmissing/file.jpg 2\n\nb/c/z1.jpg\n")
    src = sources.open_source({"kind": "file_list", "list_file": str(listing), "root": str(root)})
    assert src.num_examples == 5
    assert [src.label(i) for i in range(5)] == [3, 5, 1, 2, -1]
    decoded = _decoded(src)
    assert sorted(decoded) == [0, 1, 4]
    np.testing.assert_array_equal(decoded[1], arrays["b/y1.png"])
    assert [e["label"] for e in sources.examples(src)] == [3, 5, -1]
    with pytest.raises(OSError):  # a listed file that is not there: the pipeline replaces it
        src.read(3)
    with pytest.raises(IndexError):
        src.read(5)


def test_file_sources_pickle_with_their_listing(folder):
    root, _ = folder
    src = sources.open_source({"kind": "folder", "root": str(root)})
    copy = pickle.loads(pickle.dumps(src))
    assert copy.name == src.name and copy.num_examples == src.num_examples
    for i in range(src.num_examples):
        assert copy.read(i) == src.read(i) and copy.label(i) == src.label(i)


@pytest.mark.parametrize("spec,words", [
    ({"kind": "folder", "root": "/nonexistent/images"}, "does not exist"),
    ({"kind": "file_list", "list_file": "/nonexistent/train.txt", "root": "/tmp"}, "does not exist"),
    ({"kind": "tfds", "name": "imagenet2012", "split": "train", "data_dir": "/nonexistent/tfds"},
     r"tfds build imagenet2012 --data_dir=/nonexistent/tfds --file_format=array_record --manual_dir="),
])
def test_missing_data_raises_one_clear_error(spec, words):
    with pytest.raises(sources.SourceError, match=words):
        sources.open_source(spec)


def test_empty_folder_and_list_raise(tmp_path):
    with pytest.raises(sources.SourceError, match="holds no"):
        sources.open_source({"kind": "folder", "root": str(tmp_path)})
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(sources.SourceError, match="is empty"):
        sources.open_source({"kind": "file_list", "list_file": str(tmp_path / "empty.txt"), "root": str(tmp_path)})


@pytest.mark.parametrize("spec,words", [
    ({"kind": "lmdb", "root": "/x"}, "unknown source kind"),
    ({"kind": "folder", "root": "/x", "num_train": 3}, "has no fields"),
])
def test_bad_specs_raise_value_errors(spec, words):
    with pytest.raises(ValueError, match=words):
        sources.open_source(spec)


def test_decode_matches_pillow_for_every_format():
    rgb = _photo()
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 100, np.uint8)], axis=-1)
    cases = {
        "png": (_encoded(rgb, "PNG"), rgb),
        "png rgba": (_encoded(rgba, "PNG"), rgb),  # alpha is dropped
        "png gray": (_encoded(rgb[..., 0], "PNG"), np.repeat(rgb[..., :1], 3, axis=-1)),
        "bmp": (_encoded(rgb, "BMP"), rgb),
    }
    for name, (data, expected) in cases.items():
        got = sources.decode(data)
        assert got.dtype == np.uint8 and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    for name, data in {"jpeg": _encoded(rgb, "JPEG", quality=90),
                       "progressive": _encoded(rgb, "JPEG", quality=90, progressive=True),
                       "gray jpeg": _encoded(rgb[..., 1], "JPEG", quality=90)}.items():
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        err = np.abs(sources.decode(data).astype(int) - reference)
        assert err.mean() < 1.5 and err.max() <= 12, name


def test_decode_reads_the_first_frame_of_a_gif():
    frames = [np.full((20, 30, 3), value, np.uint8) for value in ((200, 30, 30), (30, 200, 30))]
    buffer = io.BytesIO()
    Image.fromarray(frames[0]).save(buffer, format="GIF", save_all=True,
                                    append_images=[Image.fromarray(frames[1])])
    got = sources.decode(buffer.getvalue())
    assert got.shape == (20, 30, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - frames[0]).max() <= 8  # GIF palettes may shift a colour slightly


def test_decode_rejects_garbage_and_every_truncation():
    rgb = _photo(120, 160)
    baseline = _encoded(rgb, "JPEG", quality=90)
    progressive = _encoded(rgb, "JPEG", quality=90, progressive=True)
    png = _encoded(rgb, "PNG")
    bad = {"empty": b"", "text": b"this is not an image", "jpeg header only": baseline[:2],
           "png header only": png[:16], "gif header only": b"GIF89a\x10\x00"}
    for fraction in (0.05, 0.3, 0.7, 0.99):
        bad[f"jpeg {fraction}"] = baseline[:int(len(baseline) * fraction)]
        bad[f"progressive {fraction}"] = progressive[:int(len(progressive) * fraction)]
        bad[f"png {fraction}"] = png[:int(len(png) * fraction)]
    bad["jpeg without its last byte"] = baseline[:-1]
    for name, data in bad.items():
        with pytest.raises(sources.DecodeError):
            sources.decode(data)
            pytest.fail(f"decoded {name}")
    assert issubclass(sources.DecodeError, ValueError)
    # Bytes after the end-of-image marker are not truncation.
    np.testing.assert_array_equal(sources.decode(baseline + b"\x00" * 64 + b"trailer"), sources.decode(baseline))


def test_jpeg_completeness_check_ignores_a_thumbnail_end_marker():
    # The check that catches truncation where OpenCV (before 5) returns a partial image: it must find the
    # main image's end marker, not the one of a JPEG thumbnail inside an EXIF segment before the scan.
    thumbnail = _encoded(_photo(8, 8, seed=1), "JPEG", quality=80)
    data = _encoded(_photo(), "JPEG", quality=90, exif=b"Exif\x00\x00" + thumbnail)
    assert thumbnail in data and sources._jpeg_complete(data)
    for cut in (len(data) // 2, len(data) - 2, len(data) - 1):
        assert not sources._jpeg_complete(data[:cut])
    with pytest.raises(sources.DecodeError):
        sources.decode(data[:len(data) // 2])


def test_importing_sources_does_not_import_tensorflow():
    code = ("import sys, insloc_jax.data.sources, insloc_jax.data.synthetic; "
            "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


SMALL = dict(image_size=48, num_train=12, num_test=4, num_classes=3)


def test_synthetic_is_reproducible_from_its_seed(tmp_path):
    config = SMALL
    a = _decoded(sources.open_source({"kind": "synthetic", "data_dir": str(tmp_path / "a"), **config}))
    b = _decoded(sources.open_source({"kind": "synthetic", "data_dir": str(tmp_path / "b"), **config}))
    c = _decoded(sources.open_source({"kind": "synthetic", "data_dir": str(tmp_path / "c"), **config,
                                      "seed": 1}))
    assert len(a) == 12 and a[0].shape == (48, 48, 3)
    for i in a:
        np.testing.assert_array_equal(a[i], b[i])
    assert np.mean([np.abs(a[i].astype(int) - c[i]).mean() for i in a]) > 20
    held_out = sources.open_source({"kind": "synthetic", "data_dir": str(tmp_path / "a"), "split": "test",
                                    **config})
    assert held_out.num_examples == 4
    # The held-out split is other images of the same distribution, with known labels.
    test = _decoded(held_out)
    assert min(np.abs(test[i].astype(int) - a[i]).mean() for i in test) > 8
    assert [held_out.label(i) for i in range(4)] == [synthetic.generate_image(0, 1, i, 48, 3)[1] for i in range(4)]


def test_synthetic_files_are_the_generated_images_and_labels(tmp_path):
    directory = synthetic.prepare(str(tmp_path), **SMALL)
    assert directory == synthetic.dataset_dir(str(tmp_path), **SMALL)
    assert directory.endswith(os.path.join("insloc_synthetic", "s48_tr12_te4_c3_seed0", "3.0.0"))
    assert sorted(os.listdir(directory)) == ["info.json", "test", "test.txt", "train", "train.txt"]
    src = sources.open_source({"kind": "synthetic", "data_dir": str(tmp_path), **SMALL})
    assert src.name == "synthetic:s48_tr12_te4_c3_seed0:train" and src.num_examples == 12
    for i in range(src.num_examples):
        image, label = synthetic.generate_image(0, 0, i, 48, 3)
        assert src.label(i) == label
        expected = sources.decode(_encoded(image, "JPEG", quality=95))  # as TFDS stored version 2.0.0
        np.testing.assert_array_equal(sources.decode(src.read(i)), expected)
    mtime = os.path.getmtime(os.path.join(directory, "info.json"))
    assert synthetic.prepare(str(tmp_path), **SMALL) == directory  # reused, not generated again
    assert os.path.getmtime(os.path.join(directory, "info.json")) == mtime


def test_synthetic_generation_that_dies_leaves_nothing_that_counts_as_prepared(tmp_path, monkeypatch):
    real = synthetic._write_block

    def dies(*args):
        if args[4] == "test":
            raise KeyboardInterrupt  # as if killed after the training split
        return real(*args)

    monkeypatch.setattr(synthetic, "_write_block", dies)
    with pytest.raises(KeyboardInterrupt):
        synthetic.prepare(str(tmp_path), **SMALL)
    parent = os.path.dirname(synthetic.dataset_dir(str(tmp_path), **SMALL))
    assert os.listdir(parent) == []
    # A leftover of a generation whose process is gone (SIGKILL leaves it) is removed and never used.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    leftover = os.path.join(parent, f"3.0.0.incomplete-{socket.gethostname()}-{int(dead.stdout)}")
    os.makedirs(os.path.join(leftover, "train"))
    monkeypatch.setattr(synthetic, "_write_block", real)
    directory = synthetic.prepare(str(tmp_path), **SMALL)
    assert os.listdir(parent) == ["3.0.0"] and len(os.listdir(os.path.join(directory, "train"))) == 12


def test_synthetic_instances_of_a_class_differ_and_labels_cover_classes():
    draws = [synthetic.generate_image(0, 0, i, 64, 4) for i in range(40)]
    labels = np.array([label for _, label in draws])
    assert set(labels.tolist()) == {0, 1, 2, 3}
    for c in range(4):
        members = [img.astype(int) for img, label in draws if label == c]
        diffs = [np.abs(members[i] - members[j]).mean() for i in range(len(members)) for j in range(i)]
        assert min(diffs) > 8  # no two instances are near-duplicates (mean gap of 8+ gray levels)
    np.testing.assert_array_equal(synthetic.generate_image(0, 0, 5, 64, 4)[0], draws[5][0])


def test_synthetic_bad_settings_raise():
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.prepare("/nonexistent", num_classes=synthetic.MAX_CLASSES + 1)
    with pytest.raises(ValueError, match="splits"):
        sources.open_source({"kind": "synthetic", "data_dir": "/nonexistent", "split": "validation"})


def test_synthetic_generation_on_every_core_writes_the_same_files(tmp_path, monkeypatch):
    config = dict(image_size=24, num_train=2 * synthetic.BLOCK + 5, num_test=7, num_classes=4, seed=3)
    serial = synthetic.prepare(str(tmp_path / "serial"), **config)
    monkeypatch.setattr(synthetic, "PARALLEL_FROM", 1)
    monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 2)  # two workers even on a one-core machine
    contexts = []
    get_context = synthetic.multiprocessing.get_context
    monkeypatch.setattr(synthetic.multiprocessing, "get_context",
                        lambda method: contexts.append(method) or get_context(method))
    parallel = synthetic.prepare(str(tmp_path / "parallel"), **config)
    assert contexts == ["spawn"]  # the worker processes did run
    for name in ("train.txt", "test.txt"):
        with open(os.path.join(serial, name)) as a, open(os.path.join(parallel, name)) as b:
            assert a.read() == b.read()
    for split, count in (("train", config["num_train"]), ("test", config["num_test"])):
        files = sorted(os.listdir(os.path.join(serial, split)))
        assert len(files) == count and files == sorted(os.listdir(os.path.join(parallel, split)))
        for name in files:
            with open(os.path.join(serial, split, name), "rb") as a, \
                    open(os.path.join(parallel, split, name), "rb") as b:
                assert a.read() == b.read(), f"{split}/{name}"


def test_pipeline_skips_and_counts_corrupt_files(folder, caplog):
    root, arrays = folder
    src = sources.open_source({"kind": "folder", "root": str(root)})
    bad = {i for i in range(src.num_examples) if "broken" in src.path(i) or "truncated" in src.path(i)}
    with caplog.at_level(logging.WARNING):
        batches = pipeline.make_pipeline(source={"kind": "folder", "root": str(root)}, **PIPE)
        seen = np.concatenate([next(batches)["index"].ravel() for _ in range(6)])  # 24 samples, 4 epochs
    assert not set(seen.tolist()) & bad
    assert batches.skipped >= 4  # each epoch meets both bad files at least once
    assert "undecodable" in caplog.text


def test_pipeline_on_a_file_list_with_missing_and_corrupt_entries(folder, tmp_path):
    # Entries 2 (garbage) and 3 (no such file) are replaced; the labels are checked above.
    root, _ = folder
    listing = tmp_path / "train.txt"
    listing.write_text("a/x1.jpg 3\nb/y1.png 5\na/broken.jpg 1\nmissing/file.jpg 2\n\nb/c/z1.jpg\n")
    batches = pipeline.make_pipeline(
        source={"kind": "file_list", "list_file": str(listing), "root": str(root)}, **PIPE)
    seen = np.concatenate([next(batches)["index"].ravel() for _ in range(3)])
    assert set(seen.tolist()) <= {0, 1, 4} and batches.skipped > 0



def _full_canvas_image(seed, split_id, index, size, num_classes):
    """The embedded image by its definition: every object's mask, texture and shading over the whole
    canvas, colour channels broadcast together (generate_image computes only each object's bounding square)."""
    from insloc_jax.data import shapes

    rng = np.random.default_rng([seed, split_id, index])
    label = int(rng.integers(num_classes))
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    canvas = shapes.background(rng, size)

    def draw(canvas, shape, texture, hue, radius):
        cx, cy = rng.uniform(-0.6, 0.6, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / radius
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / radius
        mask = shapes.shape_mask(shape, u, v, aspect=rng.uniform(0.7, 1.3))
        pattern = shapes.texture(texture, u, v, rng)[..., None]
        light = (0.75 + 0.25 * np.clip(1.0 - 0.5 * ((u - 0.3) ** 2 + (v + 0.3) ** 2), 0, 1))[..., None]
        a = shapes.hsv_colour(hue % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
        b = shapes.hsv_colour((hue + rng.uniform(-0.08, 0.08)) % 1.0, rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.6))
        return np.where(mask[..., None], (pattern * a + (1 - pattern) * b) * light, canvas)

    for _ in range(int(rng.integers(1, 4))):
        canvas = draw(canvas, int(rng.integers(len(shapes.SHAPES))), int(rng.integers(len(shapes.TEXTURES))),
                      rng.random(), rng.uniform(0.12, 0.25))
    shape, texture = synthetic.class_style(label)
    canvas = draw(canvas, shape, texture, rng.random(), rng.uniform(0.3, 0.6))
    return np.clip(canvas + rng.normal(0.0, 4.0, canvas.shape), 0, 255).round().astype(np.uint8), label


@pytest.mark.parametrize("size", [48, 112])
def test_synthetic_images_equal_their_full_canvas_definition(size):
    # 40 images cover every shape and texture (8 x 5 style draws per distractor), so a bounding square too
    # small for any shape would cut pixels off and show here.
    for index in range(40):
        image, label = synthetic.generate_image(0, index % 2, index, size, 10)
        want, want_label = _full_canvas_image(0, index % 2, index, size, 10)
        assert label == want_label
        np.testing.assert_array_equal(image, want, err_msg=f"image {index}")
