"""The embedded instance-segmentation set (data/scenes.py): annotations against pixels, files, layout."""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from insloc_jax.data import scenes, synthetic

SET = dict(image_size=128, num_train=8, num_val=4, num_classes=10, seed=0)


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("scenes"))
    return data_dir, scenes.prepare(data_dir, **SET)


def _split(directory, split):
    """The split's COCO dict, its images from disk and its masks decoded from the JSON's RLE, per image id."""
    image_dir, annotations_json = scenes.split_paths(directory, split)
    with open(annotations_json) as f:
        coco = json.load(f)
    images = {e["id"]: np.asarray(Image.open(os.path.join(image_dir, e["file_name"])).convert("RGB"))
              for e in coco["images"]}
    masks = {e["id"]: [] for e in coco["images"]}
    for a in coco["annotations"]:
        masks[a["image_id"]].append(mask_utils.decode(a["segmentation"]).astype(bool))
    return coco, images, masks


def _recorded_scene(monkeypatch, *args):
    """generate_scene(*args) and the full painted mask [S, S] of every object, in painting order."""
    painted = []
    real = synthetic.draw_object

    def recording(canvas, *rest, **kwargs):
        rows, cols, mask = real(canvas, *rest, **kwargs)
        full = np.zeros(canvas.shape[:2], bool)
        full[rows, cols] = mask
        painted.append(full)
        return rows, cols, mask

    monkeypatch.setattr(synthetic, "draw_object", recording)
    image, instances = scenes.generate_scene(*args)
    monkeypatch.setattr(synthetic, "draw_object", real)
    return image, instances, painted


def test_draw_object_returns_exactly_the_pixels_it_painted():
    rng = np.random.default_rng(7)
    for shape in range(8):
        canvas = np.full((64, 64, 3), -1.0)  # no colour of the palette (0..255) is negative
        rows, cols, mask = synthetic.draw_object(canvas, rng, shape, texture=shape % 5, hue=0.3, radius=0.4)
        placed = np.zeros((64, 64), bool)
        placed[rows, cols] = mask
        np.testing.assert_array_equal((canvas != -1).any(axis=2), placed)
        assert placed.sum() > 50


def test_masks_lie_on_the_colour_edges_of_the_images(scene_set):
    _, images, masks = _split(scene_set[1], "train")

    def boundary_gradient(image, mask):
        gy, gx = np.gradient(image.astype(np.float64), axis=(0, 1))  # [S, S, 3] each
        strength = np.sqrt((gx ** 2 + gy ** 2).sum(axis=2))  # [S, S]
        inner = np.pad(mask, 1)  # a mask pixel with a 4-neighbour outside the mask lies on its boundary
        edge = mask & ~(inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:])
        edge[[0, -1], :] = edge[:, [0, -1]] = False  # the image frame is no colour edge
        return strength[edge].sum(), edge.sum(), strength[mask & ~edge].sum(), (mask & ~edge).sum()

    def shifted(mask):  # 2 px right and down: a shift along one axis keeps the edges parallel to it
        return np.pad(mask, ((2, 0), (2, 0)))[:-2, :-2]

    totals = np.zeros((3, 2))  # (gradient sum, pixels) on the boundary, shifted boundary, interior
    for image_id, image in images.items():
        for mask in masks[image_id]:
            on_edge, edge, interior, inner = boundary_gradient(image, mask)
            off_edge, off = boundary_gradient(image, shifted(mask))[:2]
            assert edge and off and on_edge / edge > off_edge / off  # every instance, not only on average
            totals += (on_edge, edge), (off_edge, off), (interior, inner)
    on_edges, off_edges, inside = totals[:, 0] / totals[:, 1]
    assert on_edges > 1.5 * off_edges and on_edges > 2.5 * inside, (on_edges, off_edges, inside)


def test_images_on_disk_are_the_generated_images(scene_set):
    for split in ("train", "val"):
        coco, images, _ = _split(scene_set[1], split)
        assert [e["id"] for e in coco["images"]] == list(range(1, SET[f"num_{split}"] + 1))
        for index, entry in enumerate(coco["images"]):
            image, _ = scenes.generate_scene(0, scenes.SPLIT_IDS[split], index, 128, 10)
            assert entry["file_name"] == f"{index:06d}.jpg" and (entry["width"], entry["height"]) == (128, 128)
            encoded = io.BytesIO()
            Image.fromarray(image).save(encoded, format="JPEG", quality=95)
            np.testing.assert_array_equal(images[entry["id"]], np.asarray(Image.open(encoded)))
            # JPEG's chroma subsampling blurs the grain (sd 4 per channel) away: errors of its size.
            assert np.abs(images[entry["id"]].astype(int) - image).mean() < 10


def test_annotations_are_the_generator_masks_with_tight_boxes_and_pixel_areas(scene_set):
    for split in ("train", "val"):
        coco, _, masks = _split(scene_set[1], split)
        assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
        for index, entry in enumerate(coco["images"]):
            _, instances = scenes.generate_scene(0, scenes.SPLIT_IDS[split], index, 128, 10)
            annotations = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
            assert [a["category_id"] - 1 for a in annotations] == [label for label, _ in instances]
            for a, mask, (_, expected) in zip(annotations, masks[entry["id"]], instances):
                np.testing.assert_array_equal(mask, expected)
                ys, xs = np.nonzero(mask)
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert a["area"] == len(xs) >= scenes.MIN_VISIBLE_PIXELS and a["iscrowd"] == 0
            assert np.sum(masks[entry["id"]], axis=0).max() == 1  # disjoint, and no image without instances


def test_pycocotools_loads_and_scores_the_files(scene_set):
    _, annotations_json = scenes.split_paths(scene_set[1], "val")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(annotations_json)
        names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
        assert names[:3] == ["disc-stripes", "square-dots", "triangle-gradient"] and len(names) == 10
        assert len(coco.getImgIds()) == SET["num_val"]
        first = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
        assert coco.annToMask(first).sum() == first["area"]
        # The annotations as detections: a perfect score in both of the evaluations fine-tuning reports.
        found = coco.loadRes([dict(a, score=1.0) for a in coco.loadAnns(coco.getAnnIds())])
        for kind in ("bbox", "segm"):
            evaluation = COCOeval(coco, found, kind)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            assert evaluation.stats[0] == pytest.approx(1.0), kind


def test_later_objects_occlude_earlier_ones_and_hidden_ones_are_dropped(monkeypatch):
    overlaps = partly_hidden = 0
    for index in range(120):
        _, instances, painted = _recorded_scene(monkeypatch, 3, 0, index, 96, 10)
        visible = [mask & ~np.any(painted[k + 1:], axis=0) for k, mask in enumerate(painted)]
        kept = [mask for mask in visible if mask.sum() >= scenes.MIN_VISIBLE_PIXELS]
        assert len(instances) == len(kept) and 1 <= len(kept) <= 6
        for (_, mask), expected in zip(instances, kept):
            np.testing.assert_array_equal(mask, expected)
        overlaps += sum(np.any(p & q) for k, p in enumerate(painted) for q in painted[k + 1:])
        partly_hidden += sum(0 < mask.sum() < scenes.MIN_VISIBLE_PIXELS for mask in visible)
    assert overlaps >= 30 and partly_hidden >= 3  # both cases were exercised


def test_size_ranges_and_counts_in_info(scene_set):
    with open(os.path.join(scene_set[1], "info.json")) as f:
        info = json.load(f)
    assert info["version"] == scenes.DATASET_VERSION and info["min_visible_pixels"] == 20
    assert {k: info[k] for k in SET} == SET
    for split in ("train", "val"):
        coco, _, _ = _split(scene_set[1], split)
        areas = np.array([a["area"] for a in coco["annotations"]])
        counts = info["splits"][split]
        assert counts["images"] == SET[f"num_{split}"] and counts["instances"] == len(areas)
        assert counts["small"] == np.sum(areas < 32 * 32) and counts["large"] == np.sum(areas > 96 * 96)
        assert counts["medium"] == np.sum((areas >= 32 * 32) & (areas <= 96 * 96))
        split_id = scenes.SPLIT_IDS[split]
        drawn = sum(len(scenes.draw_scene(0, split_id, i, 128, 10)[1]) for i in range(counts["images"]))
        assert counts["dropped"] == drawn - len(areas)


def test_radii_span_coco_size_ranges_at_128_pixels():
    areas = np.array([mask.sum() for i in range(60) for _, mask in scenes.generate_scene(5, 0, i, 128, 10)[1]])
    assert np.mean(areas < 32 * 32) > 0.3 and np.mean((areas >= 32 * 32) & (areas <= 96 * 96)) > 0.3
    assert np.sum(areas > 96 * 96) >= 2


def test_prepare_is_versioned_and_idempotent(scene_set, monkeypatch):
    data_dir, directory = scene_set
    expected = os.path.join(data_dir, "insloc_scenes", "s128_tr8_va4_c10_seed0", "1.0.0")
    assert directory == expected == scenes.dataset_dir(data_dir, **SET)
    assert sorted(os.listdir(directory)) == ["annotations", "info.json", "train", "val"]
    assert sorted(os.listdir(os.path.join(directory, "annotations"))) == ["instances_train.json",
                                                                          "instances_val.json"]
    assert sorted(os.listdir(os.path.join(directory, "val"))) == [f"00000{i}.jpg" for i in range(4)]
    monkeypatch.setattr(scenes, "_write_split", lambda *args: pytest.fail("generated again"))
    assert scenes.prepare(data_dir, **SET) == directory


def test_generation_that_dies_leaves_nothing_that_counts_as_prepared(tmp_path, monkeypatch):
    real = scenes._write_split

    def dies(work, split, *args):
        if split == "val":
            raise KeyboardInterrupt  # as if killed after the training split
        return real(work, split, *args)

    config = dict(SET, image_size=64, num_train=2, num_val=1)
    monkeypatch.setattr(scenes, "_write_split", dies)
    with pytest.raises(KeyboardInterrupt):
        scenes.prepare(str(tmp_path), **config)
    parent = os.path.dirname(scenes.dataset_dir(str(tmp_path), **config))
    assert os.listdir(parent) == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.makedirs(os.path.join(parent, f"1.0.0.incomplete-{socket.gethostname()}-{int(dead.stdout)}", "train"))
    monkeypatch.setattr(scenes, "_write_split", real)
    directory = scenes.prepare(str(tmp_path), **config)
    assert os.listdir(parent) == ["1.0.0"] and len(os.listdir(os.path.join(directory, "train"))) == 2


def test_scene_streams_are_not_pretraining_streams():
    # SeedSequence pads with zeros, so the scene streams would collide with pretraining images if the
    # stream word were a pretraining split id; compare the generators' states directly.
    pretraining = {tuple(np.random.SeedSequence([s, split, i]).generate_state(4))
                   for s in range(2) for split in (0, 1) for i in range(8)}
    ours = {tuple(np.random.SeedSequence([s, scenes.SCENES_STREAM, split, i]).generate_state(4))
            for s in range(2) for split in (0, 1) for i in range(8)}
    assert len(ours) == 32 and not ours & pretraining
    assert scenes.SCENES_STREAM not in synthetic.SPLIT_IDS.values()


@pytest.mark.parametrize("field, value", [("image_size", 32), ("num_train", 0), ("num_val", 0),
                                          ("num_classes", synthetic.MAX_CLASSES + 1), ("seed", -1)])
def test_bad_settings_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        scenes.prepare("/nonexistent", **{field: value})


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        scenes.split_paths("/nonexistent", "test")
