"""Sources: folder, file list, tfds (mocked), the embedded dataset; corrupt files and missing data."""
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from insloc_jax.data import pipeline, sources, synthetic

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
    return {int(e["index"]): e["image"] for e in sources.examples(source).as_numpy_iterator()}


def test_folder_lists_sorted_images_and_decodes_good_ones(folder):
    root, arrays = folder
    src = sources.open_source({"kind": "folder", "root": str(root)})
    paths = [os.path.relpath(p.decode(), root) for p in src.table.numpy()]
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


def test_pipeline_skips_and_counts_corrupt_files(folder, caplog):
    root, arrays = folder
    src = sources.open_source({"kind": "folder", "root": str(root)})
    bad = {i for i, p in enumerate(src.table.numpy()) if b"broken" in p or b"truncated" in p}
    with caplog.at_level(logging.WARNING):
        batches = pipeline.make_pipeline(source={"kind": "folder", "root": str(root)}, **PIPE)
        seen = np.concatenate([next(batches)["index"].ravel() for _ in range(6)])  # 24 samples, 4 epochs
    assert not set(seen.tolist()) & bad
    assert batches.skipped >= 4  # each epoch meets both bad files at least once
    assert "undecodable" in caplog.text


def test_file_list_with_labels_missing_and_corrupt_entries(folder, tmp_path):
    root, arrays = folder
    listing = tmp_path / "train.txt"
    listing.write_text("a/x1.jpg 3\nb/y1.png 5\na/broken.jpg 1\nmissing/file.jpg 2\n\nb/c/z1.jpg\n")
    src = sources.open_source({"kind": "file_list", "list_file": str(listing), "root": str(root)})
    assert src.num_examples == 5
    np.testing.assert_array_equal(src.labels.numpy(), [3, 5, 1, 2, -1])
    decoded = _decoded(src)
    assert sorted(decoded) == [0, 1, 4]
    np.testing.assert_array_equal(decoded[1], arrays["b/y1.png"])
    batches = pipeline.make_pipeline(
        source={"kind": "file_list", "list_file": str(listing), "root": str(root)}, **PIPE)
    seen = np.concatenate([next(batches)["index"].ravel() for _ in range(3)])
    assert set(seen.tolist()) <= {0, 1, 4} and batches.skipped > 0


@pytest.mark.parametrize("spec,words", [
    ({"kind": "folder", "root": "/nonexistent/images"}, "does not exist"),
    ({"kind": "file_list", "list_file": "/nonexistent/train.txt", "root": "/tmp"}, "does not exist"),
    ({"kind": "tfds", "name": "imagenet2012", "split": "train", "data_dir": "/nonexistent/tfds"},
     "tfds build imagenet2012"),
])
def test_missing_data_raises_one_clear_error(spec, words):
    with pytest.raises(sources.SourceError, match=words):
        sources.open_source(spec)


def test_empty_folder_raises(tmp_path):
    with pytest.raises(sources.SourceError, match="holds no"):
        sources.open_source({"kind": "folder", "root": str(tmp_path)})


@pytest.mark.parametrize("in_memory", [False, True])
def test_tfds_path_under_mock_data(in_memory):
    spec = {"kind": "tfds", "name": "imagenet2012", "split": "train", "in_memory": in_memory}
    with tfds.testing.mock_data(num_examples=12):
        src = sources.open_source(spec)
        assert src.num_examples == 12 and src.indexable == in_memory
        batches = pipeline.make_pipeline(source=spec, per_device_batch=2, local_devices=8, canvas_size=96,
                                         fg_size_range=(32, 80), background_mode="dataset",
                                         augment_on="host")
        batch = next(batches)
    assert batch["image1"].shape == (8, 2, 96, 96, 3) and batch["image1"].dtype == np.float32
    assert batch["index"].min() >= 0 and batch["index"].max() < 12
    np.testing.assert_array_equal(batch["position"].ravel(), np.arange(16))


def test_synthetic_is_reproducible_from_its_seed(tmp_path):
    config = dict(image_size=48, num_train=12, num_test=4, num_classes=3)
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


def test_synthetic_instances_of_a_class_differ_and_labels_cover_classes():
    draws = [synthetic.generate_image(0, 0, i, 64, 4) for i in range(40)]
    labels = np.array([label for _, label in draws])
    assert set(labels.tolist()) == {0, 1, 2, 3}
    for c in range(4):
        members = [img.astype(int) for img, label in draws if label == c]
        diffs = [np.abs(members[i] - members[j]).mean() for i in range(len(members)) for j in range(i)]
        assert min(diffs) > 8  # no two instances are near-duplicates (mean gap of 8+ gray levels)
    np.testing.assert_array_equal(synthetic.generate_image(0, 0, 5, 64, 4)[0], draws[5][0])


def test_synthetic_generation_on_every_core_draws_the_same_images_in_order(monkeypatch):
    import functools

    monkeypatch.setattr(synthetic, "PARALLEL_FROM", 1)
    monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 2)  # two workers even on a one-core machine
    draw = functools.partial(synthetic._draw_indexed, 3, 1, 24, 4)
    parallel = list(synthetic._map_in_parallel(draw, 5))
    assert [i for i, _, _ in parallel] == list(range(5))
    for i, image, label in parallel:
        expected, expected_label = synthetic.generate_image(3, 1, i, 24, 4)
        np.testing.assert_array_equal(image, expected)
        assert label == expected_label


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
