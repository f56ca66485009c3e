"""Box augmentation (REFERENCE section 2) in torch: IoU, the anchors, greedy NMS, one random survivor per box.

The random draws are inputs (two uniform numbers per anchor and sample), so a test can give this code the
draws of another implementation and compare the boxes it picks.
"""
import torch


def box_iou(a, b):
    """[N, 4] x [M, 4] xyxy -> [N, M] IoU."""
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def anchor_grid(image: int, stride: int = 16, base: int = 16, scales=(2, 4, 8, 16),
                ratios=(0.5, 0.75, 1.0, 1.5, 2.0)) -> torch.Tensor:
    """[A, 4] anchors: centres (16x, 16y) over the image, w = 16s / sqrt(r), h = 16s * sqrt(r)."""
    sizes = torch.tensor([(base * s / r**0.5, base * s * r**0.5) for s in scales for r in ratios])  # [S*R, 2]
    centres = torch.arange(0, image, stride, dtype=torch.float32)
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    c = torch.stack([cx.flatten(), cy.flatten()], dim=1)[:, None, :]  # [P, 1, 2]
    return torch.cat([c - sizes / 2, c + sizes / 2], dim=-1).reshape(-1, 4)


def greedy_nms(boxes, scores, groups, threshold):
    """Greedy NMS within each group, from the definition (torchvision.ops.batched_nms's contract).

    Args:
      boxes: [M, 4]; scores: [M]; groups: [M] group ids; threshold: a box goes when its IoU with a kept box
        of its group exceeds this.

    Returns:
      [K] indices of the kept boxes (by group, then highest score first; ties to the lower index).
    """
    kept = []
    for group in torch.unique(groups).tolist():
        members = torch.nonzero(groups == group).flatten().tolist()
        remaining = sorted(members, key=lambda i: (-float(scores[i]), i))
        while remaining:
            best = remaining.pop(0)
            kept.append(best)
            if remaining:
                overlap = box_iou(boxes[best][None], boxes[remaining])[0].tolist()
                remaining = [i for i, o in zip(remaining, overlap) if o <= threshold]
    return torch.tensor(kept, dtype=torch.long)


def augment_boxes(boxes, anchors, scores, draws, iou_threshold=0.5, nms_threshold=0.7, top_k=4000,
                  nms=greedy_nms):
    """InsLoc's box augmentation of N true boxes.

    Candidates of box n are the anchors of IoU > iou_threshold with it (else its top_k anchors of highest
    IoU); NMS by scores[n] keeps some of them; the survivor of largest draws[n] is box n's new box.

    Args:
      boxes: [N, 4]; anchors: [A, 4]; scores, draws: [N, A] uniform draws; nms: `greedy_nms` or
        torchvision.ops.batched_nms (the same contract, fast on GPUs).

    Returns:
      [N, 4] the chosen anchors.
    """
    ious = box_iou(boxes, anchors)  # [N, A]
    candidates = ious > iou_threshold
    # Fallback order: highest IoU first, ties to the lower index (a stable sort of -IoU).
    order = torch.sort(-ious, dim=1, stable=True).indices[:, :min(top_k, anchors.shape[0])]
    fallback = torch.zeros_like(candidates).scatter_(1, order, True)
    candidates = torch.where(candidates.any(dim=1, keepdim=True), candidates, fallback)
    sample, anchor = candidates.nonzero(as_tuple=True)
    keep = nms(anchors[anchor], scores[sample, anchor], sample, nms_threshold)
    sample, anchor = sample[keep], anchor[keep]
    # One survivor per box: the one of largest draw (ties to the lower anchor index).
    key = draws[sample, anchor]
    best = torch.full((boxes.shape[0],), -1.0, dtype=key.dtype, device=key.device).scatter_reduce(
        0, sample, key, "amax")
    winner = torch.nonzero(key == best[sample]).flatten()
    chosen = torch.full((boxes.shape[0],), anchors.shape[0], dtype=torch.long, device=key.device).scatter_reduce(
        0, sample[winner], anchor[winner], "amin")
    return anchors[chosen]
