"""The COCO reader (finetune/coco.py) and evaluator (finetune/coco_eval.py) against pycocotools and numpy.

A small instances file is written here: five images (PNG and JPEG), category ids 1, 3 and 7 listed out of
order, masks as polygons (one and two parts), compressed RLE and uncompressed RLE (encoded by this file's
own run-length coder), a crowd region, a box under a pixel wide, an unannotated and a crowd-only image.
"""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from insloc_jax.finetune import coco, coco_eval

SIZES = {10: (40, 48), 20: (36, 44), 30: (32, 32), 40: (64, 80), 50: (24, 24)}  # image id: (H, W)
FILES = {10: "a.png", 20: "b.jpg", 30: "c.png", 40: "sub/d.png", 50: "e.png"}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.T.reshape(-1).astype(np.int64)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def polygon_mask(polygons, height, width) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))


def tight_box(mask: np.ndarray) -> list:
    """[x, y, w, h] of the pixels of a mask (pixel squares, so w = columns spanned)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]


def masks_of_fixture():
    m102 = np.zeros(SIZES[10], np.uint8)
    m102[22:35, 25:44] = 1
    m102[30:35, 25:30] = 0  # not a rectangle
    m103 = np.zeros(SIZES[10], np.uint8)
    m103[2:8, 30] = 1
    m201 = np.zeros(SIZES[20], np.uint8)
    m201[0:9, 0:15] = 1  # starts at pixel (0, 0): the RLE opens with an empty run of zeros
    m203 = np.zeros(SIZES[20], np.uint8)
    m203[25:36, 30:44] = 1
    m501 = np.ones(SIZES[50], np.uint8)
    return dict(m102=m102, m103=m103, m201=m201, m203=m203, m501=m501)


def annotations_of_fixture(m):
    p101 = [[5, 5, 20, 5, 20, 18, 5, 18]]
    p202 = [[2, 20, 12, 20, 7, 30], [30, 3, 40, 3, 40, 12, 30, 12]]
    p401 = [[10, 10, 55, 10, 55, 52, 10, 52]]
    rows = [  # id, image, category, segmentation, bbox (None: the mask's), iscrowd
        (101, 10, 3, p101, [5, 5, 15, 13], 0),
        (102, 10, 7, compressed_rle(m["m102"]), None, 0),
        (103, 10, 1, compressed_rle(m["m103"]), [30, 2, 0.5, 6], 0),  # under a pixel wide
        (201, 20, 1, uncompressed_rle(m["m201"]), None, 0),
        (202, 20, 1, p202, [2, 3, 38, 27], 0),
        (203, 20, 3, uncompressed_rle(m["m203"]), None, 1),
        (401, 40, 7, p401, [10, 10, 45, 42], 0),
        (501, 50, 1, uncompressed_rle(m["m501"]), None, 1),
    ]
    out = []
    for ann_id, image_id, category, segmentation, bbox, crowd in rows:
        h, w = SIZES[image_id]
        if isinstance(segmentation, list):
            full = polygon_mask(segmentation, h, w)
        elif isinstance(segmentation["counts"], list):
            full = mask_utils.decode(mask_utils.frPyObjects(segmentation, h, w))
        else:
            full = mask_utils.decode(segmentation)
        out.append({"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": segmentation,
                    "bbox": bbox or tight_box(full), "area": float(full.sum()), "iscrowd": crowd})
    return out


def write_fixture(root) -> tuple:
    """Writes the images and instances JSON below root; returns (image dir, JSON path, images by id)."""
    image_dir = os.path.join(root, "images")
    rng = np.random.default_rng(0)
    pixels = {}
    for image_id, (h, w) in SIZES.items():
        path = os.path.join(image_dir, FILES[image_id])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels[image_id] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels[image_id]).save(path, quality=95)
    data = {
        "images": [{"id": i, "file_name": FILES[i], "height": SIZES[i][0], "width": SIZES[i][1]}
                   for i in (30, 10, 50, 20, 40)],  # not in id order
        "annotations": annotations_of_fixture(masks_of_fixture()),
        "categories": [{"id": 7, "name": "seven"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}],
    }
    annotations = os.path.join(root, "instances.json")
    with open(annotations, "w") as f:
        json.dump(data, f)
    return image_dir, annotations, pixels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    image_dir, annotations, pixels = write_fixture(root)
    return dict(root=root, image_dir=image_dir, annotations=annotations, pixels=pixels,
                split=coco.load_split(image_dir, annotations), json=json.load(open(annotations)))


def json_annotations(dataset, image_id):
    return [a for a in dataset["json"]["annotations"] if a["image_id"] == image_id]


# ---- the reader ----

def test_split_orders_images_by_id_and_maps_categories_contiguously(dataset):
    split = dataset["split"]
    assert [r.image_id for r in split.images] == [10, 20, 30, 40, 50]
    assert split.category_ids == (1, 3, 7) and split.category_names == ("one", "three", "seven")
    assert split.category_to_label == {1: 1, 3: 2, 7: 3}
    assert split.label_to_category == {1: 1, 2: 3, 3: 7}
    assert coco.num_images(split) == 5 and coco.num_classes(split) == 3 and coco.image_id(split, 3) == 40
    # unannotated (30) and crowd-only (50) images are not training images
    assert split.train_indices.tolist() == [0, 1, 3]
    assert sorted(split.coco.getImgIds()) == [10, 20, 30, 40, 50]


def test_targets_equal_the_json_decoded_by_pycocotools(dataset):
    split, m = dataset["split"], masks_of_fixture()
    first = coco.read_example(split, 0, flip=False)
    np.testing.assert_array_equal(first.image, dataset["pixels"][10])  # PNG: lossless
    ann = {a["id"]: a for a in json_annotations(dataset, 10)}
    x, y, w, h = ann[102]["bbox"]
    np.testing.assert_array_equal(first.boxes, np.array([[5, 5, 20, 18], [x, y, x + w, y + h]], np.float32))
    assert (first.boxes.dtype, first.labels.dtype, first.masks.dtype) == (np.float32, np.int64, np.uint8)
    assert first.labels.tolist() == [2, 3]  # categories 3 and 7; 103 (0.5 px wide) is not a target
    np.testing.assert_array_equal(first.masks[0], polygon_mask([[5, 5, 20, 5, 20, 18, 5, 18]], 40, 48))
    np.testing.assert_array_equal(first.masks[1], m["m102"])  # compressed RLE round trip

    second = coco.read_example(split, 1, flip=False)
    reference = np.asarray(Image.open(os.path.join(dataset["image_dir"], "b.jpg")).convert("RGB"))
    assert second.image.shape == (36, 44, 3)
    assert np.abs(second.image.astype(int) - reference).max() <= 2  # JPEG: decoders may round differently
    assert second.labels.tolist() == [1, 1]  # the crowd region 203 is not a target
    np.testing.assert_array_equal(second.masks[0], m["m201"])  # uncompressed RLE written by this file
    p202 = [[2, 20, 12, 20, 7, 30], [30, 3, 40, 3, 40, 12, 30, 12]]
    np.testing.assert_array_equal(second.masks[1], polygon_mask(p202, 36, 44))
    np.testing.assert_array_equal(second.boxes[1], [2, 3, 40, 30])


def test_an_image_without_annotations_reads_with_empty_targets(dataset):
    example = coco.read_example(dataset["split"], 2, flip=True)
    assert (example.boxes.shape, example.labels.shape, example.masks.shape) == ((0, 4), (0,), (0, 32, 32))


def test_flip_mirrors_image_boxes_and_masks(dataset):
    split = dataset["split"]
    for index in (0, 1, 3):
        plain = coco.read_example(split, index, flip=False)
        flipped = coco.read_example(split, index, flip=True)
        width = plain.image.shape[1]
        assert flipped.flipped and not plain.flipped
        np.testing.assert_array_equal(flipped.image, plain.image[:, ::-1])
        np.testing.assert_array_equal(flipped.masks, plain.masks[:, :, ::-1])
        x0, y0, x1, y1 = plain.boxes.T
        np.testing.assert_array_equal(flipped.boxes, np.stack([width - x1, y0, width - x0, y1], 1))
    # the RLE mask's tight box, measured on the flipped mask, is the flipped box
    flipped = coco.read_example(split, 0, flip=True)
    x, y, w, h = tight_box(flipped.masks[1])
    np.testing.assert_array_equal(flipped.boxes[1], [x, y, x + w, y + h])


def test_a_truncated_jpeg_is_skipped(dataset, tmp_path):
    image_dir = str(tmp_path / "images")
    shutil.copytree(dataset["image_dir"], image_dir)
    path = os.path.join(image_dir, "b.jpg")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    split = coco.load_split(image_dir, dataset["annotations"])
    assert coco.read_example(split, 1, flip=False) is None
    assert coco.read_image(split, 1) is None
    assert coco.read_example(split, 0, flip=False) is not None


def test_missing_or_malformed_inputs_raise_one_clear_error(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="--config.data.train_annotations"):
        coco.load_split(dataset["image_dir"], str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="--config.data.val_images"):
        coco.load_split(str(tmp_path / "missing"), dataset["annotations"], name="val")
    # a directory that exists but does not hold the JSON's files
    with pytest.raises(FileNotFoundError, match="--config.data.train_images"):
        coco.load_split(str(tmp_path), dataset["annotations"])
    captions = {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}], "licenses": []}
    for name, text in (("captions.json", json.dumps(captions)), ("text.json", "not json"),
                       ("list.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="--config.data.train_annotations"):
            coco.load_split(dataset["image_dir"], str(tmp_path / name))


def test_batches_are_functions_of_seed_and_iteration(dataset):
    first = [coco.batch_indices(10, 4, 3, t) for t in range(6)]
    again = [coco.batch_indices(10, 4, 3, t) for t in reversed(range(6))][::-1]  # another order: same draws
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.int64 and a.shape == (4,) and len(set(a.tolist())) == 4 and a.max() < 10
    assert len({tuple(a) for a in first}) > 1
    assert not np.array_equal(coco.batch_indices(10, 4, 4, 0), first[0])  # the seed matters
    flips = [coco.flip_draws(16, 3, t) for t in range(6)]
    assert all(f.dtype == bool and f.shape == (16,) for f in flips)
    np.testing.assert_array_equal(coco.flip_draws(16, 3, 2), flips[2])
    assert len({tuple(f) for f in flips}) > 1
    assert 0.3 < np.mean(flips) < 0.7


def test_only_images_with_training_annotations_are_sampled(dataset):
    split = dataset["split"]
    drawn = np.concatenate([coco.batch_indices(split, 2, 0, t) for t in range(40)])
    assert set(drawn.tolist()) == {0, 1, 3}


# ---- results and evaluation ----

def gt_as_detections(dataset, shift=0.0, scores=None):
    """Every non-crowd ground-truth instance as a detection, through to_results."""
    split, gt = dataset["split"], dataset["split"].coco
    bbox, segm = [], []
    for record in split.images:
        anns = [a for a in json_annotations(dataset, record.image_id) if not a["iscrowd"]]
        if not anns:
            continue
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]) + shift
        masks = np.stack([gt.annToMask(a) for a in anns]).astype(np.float32)  # [N, H, W]
        masks = np.roll(masks, int(shift), axis=2)
        if shift:
            masks[:, :, :int(shift)] = 0
        labels = [split.category_to_label[a["category_id"]] for a in anns]
        score = np.ones(len(anns)) if scores is None else scores[:len(anns)]
        b, s = coco_eval.to_results(record.image_id, boxes, score, labels, masks, split.label_to_category)
        bbox += b
        segm += s
    return bbox, segm


def cocoeval_stats(annotations_json, results_json, iou_type):
    gt = COCO(annotations_json)
    evaluator = COCOeval(gt, gt.loadRes(results_json), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def test_ground_truth_as_detections_scores_one(dataset):
    bbox, segm = gt_as_detections(dataset)
    for iou_type, results in (("bbox", bbox), ("segm", segm)):
        metrics = coco_eval.evaluate(dataset["annotations"], results, iou_type)
        assert list(metrics) == [f"{iou_type}/{n}" for n in coco_eval.SUMMARY]
        for name in ("AP", "AP50", "AP75", "APs", "APm", "AR10", "AR100"):
            assert metrics[f"{iou_type}/{name}"] == pytest.approx(1.0), name
        assert metrics[f"{iou_type}/APl"] == -1.0  # no large object in the set


def test_shifted_boxes_score_less_exactly_as_cocoeval_on_the_saved_files(dataset, tmp_path):
    scores = np.array([0.9, 0.6, 0.8])
    bbox, segm = gt_as_detections(dataset, shift=3.0, scores=scores)
    for iou_type, results in (("bbox", bbox), ("segm", segm)):
        path = str(tmp_path / coco_eval.RESULT_FILES[iou_type])
        coco_eval.write_results(path, results)
        metrics = coco_eval.evaluate(dataset["split"].coco, results, iou_type)
        assert metrics[f"{iou_type}/AP"] < 0.8
        reference = cocoeval_stats(dataset["annotations"], path, iou_type)
        np.testing.assert_array_equal(np.array(list(metrics.values())), reference)
    assert sorted(os.listdir(tmp_path)) == ["detections_bbox.json", "detections_segm.json"]  # no temp left


def test_results_format(dataset):
    boxes = np.array([[1.5, 2.0, 11.5, 6.0], [0, 0, 4, 4]], np.float32)
    masks = np.zeros((2, 1, 8, 12), np.float32)  # torchvision's [N, 1, H, W]
    masks[0, 0, 2:5, 3:9] = 0.7
    masks[1, 0, 0:2, 0:2] = 0.5  # not above the threshold
    bbox, segm = coco_eval.to_results(10, boxes, np.array([0.9, 0.2]), np.array([3, 1]), masks,
                                      {1: 1, 2: 3, 3: 7})
    assert bbox[0] == {"image_id": 10, "category_id": 7, "bbox": [1.5, 2.0, 10.0, 4.0],
                       "score": pytest.approx(0.9)}
    assert [r["category_id"] for r in segm] == [7, 1]
    assert isinstance(segm[0]["segmentation"]["counts"], str)
    json.dumps(bbox + segm)
    expected = np.zeros((8, 12), np.uint8)
    expected[2:5, 3:9] = 1
    np.testing.assert_array_equal(mask_utils.decode(segm[0]["segmentation"]), expected)
    assert mask_utils.decode(segm[1]["segmentation"]).sum() == 0
    assert coco_eval.to_results(10, boxes, [0.9, 0.2], [3, 1], None, {1: 1, 2: 3, 3: 7})[1] == []
    empty = coco_eval.to_results(10, np.zeros((0, 4)), [], [], np.zeros((0, 8, 12)), {1: 1})
    assert empty == ([], [])


def test_no_results_score_zero_and_unknown_images_are_refused(dataset):
    metrics = coco_eval.evaluate(dataset["annotations"], [], "segm")
    assert len(metrics) == 12 and set(metrics.values()) == {0.0}
    stray = [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 1.0}]
    with pytest.raises(ValueError, match="image ids"):
        coco_eval.evaluate(dataset["annotations"], stray, "bbox")
