"""Scoring a detector on a split: predictions in COCO results format, then pycocotools' evaluation.

The workdir receives the raw detections (`detections_bbox.json`, `detections_segm.json`, COCO results
format, so any COCO tool can rescore them) and `metrics.json`: COCO's 12 box and 12 mask summary numbers
(`bbox/AP`, `bbox/AP50`, ..., `segm/ARl`) and the iteration they belong to.
"""
import json
import os
from typing import Dict, List, Tuple

from insloc_jax.export.files import write_atomic
from insloc_jax.finetune import coco, coco_eval, loop
from insloc_jax.finetune.coco_eval import IOU_TYPES, RESULT_FILES


def predict(model, split: coco.Split, batch: int, progress: bool = True) -> Tuple[List[dict], List[dict], int]:
    """Runs the model in eval mode over every readable image of `split`.

    Returns:
      (bbox results, segm results, images skipped as unreadable).
    """
    import torch
    from tqdm import tqdm

    model.eval()
    bbox, segm, skipped = [], [], 0
    order = range(0, coco.num_images(split), batch)
    with torch.no_grad():
        for start in tqdm(order, desc="evaluate", unit="batch", disable=not progress, leave=False, delay=2.0):
            stop = min(start + batch, coco.num_images(split))
            examples = [(i, coco.read_image(split, i)) for i in range(start, stop)]
            readable = [(i, image) for i, image in examples if image is not None]
            skipped += len(examples) - len(readable)
            if not readable:
                continue
            device = loop.device_of(model)
            for (index, _), output in zip(readable, model([loop.image_tensor(im, device) for _, im in readable])):
                output = {name: value.cpu().numpy() for name, value in output.items()}
                boxes, segms = coco_eval.to_results(
                    coco.image_id(split, index), output["boxes"], output["scores"], output["labels"],
                    output["masks"][:, 0], split.label_to_category)
                bbox += boxes
                segm += segms
    return bbox, segm, skipped


def evaluate(model, split: coco.Split, workdir: str, iteration: int, batch: int) -> Dict[str, float]:
    """Predicts, writes the detection files and `metrics.json`, and returns the 24 numbers (+ iteration)."""
    results = dict(zip(IOU_TYPES, predict(model, split, batch)[:2]))
    metrics: Dict[str, float] = {}
    for iou_type in IOU_TYPES:
        coco_eval.write_results(os.path.join(workdir, RESULT_FILES[iou_type]), results[iou_type])
        metrics.update(coco_eval.evaluate(split.coco, results[iou_type], iou_type))
    payload = json.dumps({"iteration": iteration, **metrics}, indent=1).encode()
    write_atomic(os.path.join(workdir, "metrics.json"), lambda f: f.write(payload), force=True)
    return metrics


def summary(metrics: Dict[str, float]) -> str:
    """One line: box and mask AP, AP50, AP75, AP_small, AP_medium (in percent, as COCO tables give them)."""
    keys = ("AP", "AP50", "AP75", "APs", "APm")
    parts = [f"{t} " + " ".join(f"{k} {100 * metrics[f'{t}/{k}']:.1f}" for k in keys) for t in IOU_TYPES]
    return " | ".join(parts)
