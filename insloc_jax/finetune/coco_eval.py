"""COCO detection and instance segmentation evaluation: results in COCO's format, scored by pycocotools.

A detector's output for one image (boxes `boxes_xyxy`, scores, contiguous labels and full-image mask
probabilities) becomes COCO result entries by `to_results`; the entries of a whole split are written by
`write_results` (detections_bbox.json / detections_segm.json, atomically) and scored by `evaluate`, which
runs pycocotools' COCOeval and returns its 12 summary numbers, e.g. {"bbox/AP": 0.31, "segm/AP50": ...}.
"""
import contextlib
import io
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from insloc_jax.export.files import write_atomic

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats in order: AP over IoU 0.5:0.95, at 0.5 and 0.75, by object size (small < 32^2 pixels <
# medium < 96^2 < large), then the average recall with at most 1, 10 and 100 detections per image and by size.
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
RESULT_FILES = {"bbox": "detections_bbox.json", "segm": "detections_segm.json"}
MASK_THRESHOLD = 0.5  # mask probabilities above this are the instance, as the detectors' own paste does


def _bbox_results(image_id: int, boxes_xyxy: np.ndarray, scores: np.ndarray,
                  categories: List[int]) -> List[dict]:
    x0, y0, x1, y1 = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4).T
    return [{"image_id": image_id, "category_id": c, "bbox": [float(a), float(b), float(w), float(h)],
             "score": float(s)}
            for a, b, w, h, s, c in zip(x0, y0, x1 - x0, y1 - y0, scores, categories)]


def _segm_results(image_id: int, masks: np.ndarray, scores: np.ndarray,
                  categories: List[int]) -> List[dict]:
    masks = np.asarray(masks)
    if masks.ndim == 4:  # torchvision's [N, 1, H, W]
        masks = masks[:, 0]
    binary = np.asfortranarray(np.moveaxis(masks > MASK_THRESHOLD, 0, -1).astype(np.uint8))  # [H, W, N]
    rles = mask_utils.encode(binary) if len(categories) else []
    results = []
    for rle, s, c in zip(rles, scores, categories):
        # counts are bytes; JSON needs str (pycocotools reads either back)
        segmentation = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        results.append({"image_id": image_id, "category_id": c, "segmentation": segmentation,
                        "score": float(s)})
    return results


def to_results(image_id: int, boxes_xyxy: np.ndarray, scores: np.ndarray, labels: np.ndarray,
               masks: Optional[np.ndarray],
               label_to_category: Mapping[int, int]) -> Tuple[List[dict], List[dict]]:
    """One image's detections as COCO result entries.

    Args:
      image_id: the image's id in the ground-truth JSON.
      boxes_xyxy: float [N, 4] (x0, y0, x1, y1) in the image's original pixels.
      scores: float [N].
      labels: int [N] contiguous labels 1..K.
      masks: float [N, H, W] (or [N, 1, H, W]) mask probabilities pasted into the full image, or None
        (a detector without masks: no segm entries).
      label_to_category: {label: the dataset's category id} (coco.Split.label_to_category).

    Returns:
      (bbox entries, segm entries): dicts with image_id, category_id, score and bbox [x, y, w, h] floats,
      or segmentation as compressed RLE ({"size": [H, W], "counts": str}) of the masks above 0.5.
    """
    image_id = int(image_id)
    scores = np.asarray(scores, np.float64).reshape(-1)
    categories = [int(label_to_category[int(label)]) for label in np.asarray(labels).reshape(-1)]
    bbox = _bbox_results(image_id, boxes_xyxy, scores, categories)
    segm = [] if masks is None else _segm_results(image_id, masks, scores, categories)
    return bbox, segm


def _quiet(verbose: bool):
    # pycocotools prints progress and the summary table; the caller logs the returned numbers instead.
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _load_gt(gt: Union[COCO, str, os.PathLike], verbose: bool) -> COCO:
    if isinstance(gt, COCO):
        return gt
    with _quiet(verbose):
        return COCO(os.fspath(gt))


def _check_image_ids(gt: COCO, results: Sequence[dict]) -> None:
    unknown = {int(r["image_id"]) for r in results} - set(gt.getImgIds())
    if unknown:  # pycocotools would only assert "Results do not correspond to current coco set"
        raise ValueError(f"results refer to {len(unknown)} image ids that the ground truth lacks, e.g. "
                         f"{sorted(unknown)[:5]}: evaluate against the annotations the images came from")


def evaluate(gt: Union[COCO, str, os.PathLike], results: Sequence[dict], iou_type: str,
             verbose: bool = False) -> Dict[str, float]:
    """Scores results against ground truth with pycocotools' COCOeval.

    Args:
      gt: the ground truth, a pycocotools COCO object or the path of its instances JSON.
      results: COCO result entries of the whole split (to_results' output for one iou_type).
      iou_type: "bbox" or "segm".
      verbose: let pycocotools print its progress and summary table.

    Returns:
      {f"{iou_type}/{name}": float} for the 12 names of SUMMARY, in COCOeval.stats order. A number is -1.0
      where pycocotools finds no ground truth to average over (e.g. APl on a set without large objects):
      that is "undefined", not "zero", and is kept as pycocotools reports it. With no results at all every
      number is 0.0: pycocotools cannot load an empty result list, and no detections recall nothing.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, not {iou_type!r}")
    if not results:
        return {f"{iou_type}/{name}": 0.0 for name in SUMMARY}
    gt = _load_gt(gt, verbose)
    _check_image_ids(gt, results)
    with _quiet(verbose):
        detections = gt.loadRes([dict(r) for r in results])  # copies: loadRes adds fields to each entry
        evaluator = COCOeval(gt, detections, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {f"{iou_type}/{name}": float(v) for name, v in zip(SUMMARY, evaluator.stats)}


def write_results(path: Union[str, os.PathLike], results: Sequence[dict]) -> None:
    """Writes result entries as JSON atomically: a reader sees the old file or the whole new one.

    Args:
      path: the file, e.g. WORKDIR/detections_bbox.json (RESULT_FILES names them); its directory is created
        if missing.
      results: COCO result entries (to_results' output).
    """
    payload = json.dumps(list(results)).encode()
    write_atomic(os.fspath(path), lambda f: f.write(payload), force=True)
