"""Analytic FLOP count of the encoders and of one InsLoc / MoCo train step, from the layer shapes.

Counted: convolutions and dense layers, 2 FLOPs per multiply-add (the convention of MFU figures and of
XLA's cost analysis). Not counted: BatchNorm, ReLU, pooling, upsampling, the L2 norm, which together are a
few percent. Two small matmul terms are reported apart, because they depend on the implementation or the
queue rather than the network: RoIAlign in its separable form (`ops/roi_align.py`: Wy @ F @ Wx^T per RoI)
and the InfoNCE logits against the queue.

One train step per sample = query forward + backward (3 x forward: the backward computes the gradients of
both the inputs and the weights of every layer) + key forward (1 x) = 4 x the encoder forward. That is the
convention behind the issue's 76.6 GFLOP (R50-FPN) and 40.7 GFLOP (R50-C4) at 256 x 256.

Spatial sizes follow PyTorch: out = floor((in + 2 * pad - k) / stride) + 1 with pad = k // 2.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
FPN_LEVELS = 4


def out_size(size: int, kernel: int, stride: int) -> int:
    """Output side of a conv / max pool with PyTorch padding kernel // 2."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def conv(size: int, cin: int, cout: int, kernel: int, stride: int = 1) -> Tuple[float, int]:
    """(FLOPs, output side) of one square conv on a size x size input, per image."""
    side = out_size(size, kernel, stride)
    return 2.0 * side * side * cin * cout * kernel * kernel, side


def dense(cin: int, cout: int) -> float:
    """FLOPs of one dense layer, per row."""
    return 2.0 * cin * cout


def block(kind: str, size: int, cin: int, planes: int, stride: int) -> Tuple[float, int, int]:
    """(FLOPs, output side, output channels) of one residual block (torchvision, stride on the 3x3)."""
    cout = planes * EXPANSION[kind]
    if kind == "basic":
        f1, side = conv(size, cin, planes, 3, stride)
        f2, _ = conv(side, planes, planes, 3)
        total = f1 + f2
    else:
        f1, _ = conv(size, cin, planes, 1)
        f2, side = conv(size, planes, planes, 3, stride)
        f3, _ = conv(side, planes, cout, 1)
        total = f1 + f2 + f3
    if stride != 1 or cin != cout:
        total += conv(size, cin, cout, 1, stride)[0]
    return total, side, cout


def stage(depth: int, width: int, index: int, size: int, cin: int) -> Tuple[float, int, int]:
    """(FLOPs, output side, output channels) of ResNet stage `index` (0 = res2 .. 3 = res5)."""
    kind, counts = BLOCKS[depth]
    total = 0.0
    for i in range(counts[index]):
        flops, size, cin = block(kind, size, cin, width * 2**index, (1 if index == 0 else 2) if i == 0 else 1)
        total += flops
    return total, size, cin


def resnet(depth: int, width: int, image: int, stages: int = 4) -> Tuple[Dict[str, float], Dict[str, Tuple[int, int]]]:
    """Per-image forward FLOPs of the stem and the first `stages` stages.

    Returns:
      ({"stem": f, "res2": f, ...}, {"res2": (side, channels), ...}).
    """
    flops, side = conv(image, 3, width, 7, 2)
    side = out_size(side, 3, 2)  # max pool
    parts, shapes, channels = {"stem": flops}, {}, width
    for i in range(stages):
        parts[f"res{i + 2}"], side, channels = stage(depth, width, i, side, channels)
        shapes[f"res{i + 2}"] = (side, channels)
    return parts, shapes


def fpn(shapes: Dict[str, Tuple[int, int]], dim: int) -> float:
    """Per-image FLOPs of the FPN neck: a 1x1 lateral and a 3x3 output conv on each of res2..res5."""
    total = 0.0
    for side, channels in shapes.values():
        total += conv(side, channels, dim, 1)[0] + conv(side, dim, dim, 3)[0]
    return total


def fpn_head(roi: int, cin: int, convs: int, conv_dim: int, fcs: int, fc_dim: int, dim: int) -> float:
    """FLOPs of the 4conv-2fc head for one RoI [roi, roi, cin]."""
    total, channels = 0.0, cin
    for _ in range(convs):
        total += conv(roi, channels, conv_dim, 3)[0]
        channels = conv_dim
    width = channels * roi * roi
    for _ in range(fcs):
        total += dense(width, fc_dim)
        width = fc_dim
    return total + dense(width, dim)


def projection(cin: int, hidden: int, dim: int) -> float:
    """FLOPs of the fc -> ReLU -> fc projection MLP for one row."""
    return dense(cin, hidden) + dense(hidden, dim)


def roi_align(side: int, channels: int, roi: int) -> float:
    """FLOPs of one RoI in the separable form: [roi, side] @ [side, side * C], then [roi, side] contracted
    again over the width for each of the roi x C rows."""
    return 2.0 * roi * side * side * channels + 2.0 * roi * roi * side * channels


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs per sample of one train step.

    Attributes:
      forward: {part: FLOPs} of one encoder forward (conv and dense layers only).
      roi_align: RoIAlign matmuls of one encoder forward (separable form).
      logits: InfoNCE logits of one sample, forward only (L levels x (1 + K) x D).
    """

    forward: Dict[str, float]
    roi_align: float
    logits: float

    @property
    def encoder_forward(self) -> float:
        """Conv + dense FLOPs of one encoder forward."""
        return sum(self.forward.values())

    @property
    def model(self) -> float:
        """Query forward + backward + key forward of the conv and dense layers: 4 x forward."""
        return 4.0 * self.encoder_forward

    @property
    def total(self) -> float:
        """`model` plus RoIAlign (query forward + backward, key forward) and the logits (forward + backward)."""
        return self.model + 4.0 * self.roi_align + 3.0 * self.logits


def encoder_forward(arch: str, depth: int = 50, width: int = 64, image: int = 256, dim: int = 128,
                    fpn_dim: int = 256, head_convs: int = 4, head_conv_dim: int = 256, head_fcs: int = 2,
                    head_fc_dim: int = 1024, mlp_dim: int = 2048, roi_size: int = 0) -> Tuple[Dict[str, float], float]:
    """Forward FLOPs of one image through the encoder (the arguments of `models.encoder.Encoder`).

    Args:
      arch: "fpn", "c4" or "moco".
      image: input side.
      roi_size: RoIAlign output side; 0 = 7 for fpn, 14 for c4.
      (the rest as in `models.encoder.Encoder`)

    Returns:
      ({part: FLOPs}, RoIAlign FLOPs) per image; fpn has four RoIs (one per level), c4 one, moco none.
    """
    parts, shapes = resnet(depth, width, image, 3 if arch == "c4" else 4)
    if arch == "fpn":
        roi = roi_size or 7
        parts["fpn"] = fpn(shapes, fpn_dim)
        parts["head"] = FPN_LEVELS * fpn_head(roi, fpn_dim, head_convs, head_conv_dim, head_fcs, head_fc_dim, dim)
        pooling = sum(roi_align(side, fpn_dim, roi) for side, _ in shapes.values())
    elif arch == "c4":
        roi = roi_size or 14
        side, channels = shapes["res4"]
        parts["head_res5"], _, c5 = stage(depth, width, 3, roi, channels)
        parts["projection"] = projection(c5, mlp_dim, dim)
        pooling = roi_align(side, channels, roi)
    elif arch == "moco":
        parts["projection"] = projection(shapes["res5"][1], mlp_dim, dim)
        pooling = 0.0
    else:
        raise ValueError(f"arch must be fpn, c4 or moco, got {arch!r}")
    return parts, pooling


def step(arch: str, image: int, queue_size: int, **encoder) -> StepFlops:
    """FLOPs per sample of one train step (see `encoder_forward` for the encoder arguments)."""
    parts, pooling = encoder_forward(arch, image=image, **encoder)
    levels = FPN_LEVELS if arch == "fpn" else 1
    logits = levels * dense(encoder.get("dim", 128), 1 + queue_size)
    return StepFlops(forward=parts, roi_align=pooling, logits=logits)


def step_from_config(config, image: int) -> StepFlops:
    """`step` for a run config (configs/base.py fields) at input side `image`."""
    m = config.model
    return step(m.arch, image, config.contrast.queue_size, depth=m.depth, width=m.width, dim=m.dim,
                fpn_dim=m.fpn_dim, head_convs=m.head_convs, head_conv_dim=m.head_conv_dim, head_fcs=m.head_fcs,
                head_fc_dim=m.head_fc_dim, mlp_dim=m.mlp_dim, roi_size=m.roi_size)
