"""Independent PyTorch reference models for the parity tests (no torchvision, no mmcv needed).

Written from the published architectures, with the module names of the PyTorch code bases the exported
weights are meant for:
  * `TorchResNet`: torchvision's ResNet (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...).
  * `MMDetInsLocFPN`: the original InsLoc mmdetection model (backbone, `neck.lateral_convs.{i}.conv|bn`,
    `neck.fpn_convs.{i}.conv|bn`, `roi_head.bbox_head.shared_convs.{i}.conv|bn`, `shared_fcs.{i}`, `fc_cls`).
  * `MMDetInsLocC4`: ResNet up to layer3, `roi_head.shared_head.layer4`, `roi_head.bbox_head.shared_fcs.0`
    and `fc_cls` (our documented names for the C4 projection MLP).
  * `roi_align_reference`: torchvision's RoIAlign written sample by sample from its definition.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from reference.models import ConvBN as ConvModule  # mmcv ConvModule with BN
from reference.models import ResNet, stage


def TorchResNet(depth=50, num_stages=4):  # noqa: N802 (a class in spirit: the torchvision-named model)
    """torchvision ResNet without avgpool / fc; forward returns {"res2": .., "res5": ..}."""
    return ResNet(depth, 64, num_stages)


def roi_align_reference(feat, boxes, output_size, scale, sampling_ratio=0):
    """torchvision `roi_align(..., aligned=True)` for one box per image, from the definition.

    Args:
      feat: [N, C, H, W]; boxes: [N, 4] xyxy in input pixels (box n on image n).

    Returns:
      [N, C, out, out].
    """
    n, c, height, width = feat.shape
    out = torch.zeros(n, c, output_size, output_size, dtype=feat.dtype)
    for r in range(n):
        x1, y1, x2, y2 = [float(v) * scale - 0.5 for v in boxes[r]]
        bin_h, bin_w = (y2 - y1) / output_size, (x2 - x1) / output_size
        grid_h = sampling_ratio or math.ceil((y2 - y1) / output_size)
        grid_w = sampling_ratio or math.ceil((x2 - x1) / output_size)
        for ph in range(output_size):
            for pw in range(output_size):
                acc = torch.zeros(c, dtype=feat.dtype)
                for iy in range(grid_h):
                    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        acc += _bilinear(feat[r], y, x, height, width)
                out[r, :, ph, pw] = acc / max(grid_h * grid_w, 1)
    return out


def _bilinear(f, y, x, height, width):
    """torchvision's bilinear_interpolate on one [C, H, W] map."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(f.shape[0], dtype=f.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return hy * hx * f[:, y0, x0] + hy * lx * f[:, y0, x1] + ly * hx * f[:, y1, x0] + ly * lx * f[:, y1, x1]


class FPNNeck(nn.Module):
    def __init__(self, in_channels=(256, 512, 1024, 2048), out=256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out, 1, False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out, out, 3, False) for _ in in_channels)

    def forward(self, feats):
        laterals = [m(feats[f"res{i + 2}"]) for i, m in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        return {f"p{i + 2}": m(laterals[i]) for i, m in enumerate(self.fpn_convs)}


class BBoxHead(nn.Module):
    """ConvFCBBoxInsClsHead: 4 conv, 2 fc, fc_cls."""

    def __init__(self, cin=256, roi=7, fc=1024, dim=128):
        super().__init__()
        self.shared_convs = nn.ModuleList(ConvModule(cin, cin, 3, True) for _ in range(4))
        self.shared_fcs = nn.ModuleList([nn.Linear(cin * roi * roi, fc), nn.Linear(fc, fc)])
        self.fc_cls = nn.Linear(fc, dim)

    def forward(self, x):
        for m in self.shared_convs:
            x = m(x)
        x = x.flatten(1)
        for m in self.shared_fcs:
            x = F.relu(m(x))
        return self.fc_cls(x)


class MMDetInsLocFPN(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TorchResNet(50)
        self.neck = FPNNeck()
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = BBoxHead()

    def forward(self, images, boxes):
        """images [B, 3, H, W], boxes [B, 4, 4] -> (res dict, p dict, [B, 4, 128] embeddings)."""
        feats = self.backbone(images)
        pyramid = self.neck(feats)
        rois = [roi_align_reference(pyramid[f"p{i + 2}"], boxes[:, i], 7, 1.0 / 2 ** (i + 2)) for i in range(4)]
        rois = torch.stack(rois, 1)  # [B, 4, 256, 7, 7]
        b = rois.shape[0]
        emb = self.roi_head.bbox_head(rois.view(b * 4, *rois.shape[2:])).view(b, 4, -1)
        return feats, pyramid, F.normalize(emb, dim=-1)


class MMDetInsLocC4(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TorchResNet(50, num_stages=3)
        self.roi_head = nn.Module()
        self.roi_head.shared_head = nn.Module()
        self.roi_head.shared_head.layer4, _ = stage("bottleneck", 1024, 512, 3, 2)
        self.roi_head.bbox_head = nn.Module()
        self.roi_head.bbox_head.shared_fcs = nn.ModuleList([nn.Linear(2048, 2048)])
        self.roi_head.bbox_head.fc_cls = nn.Linear(2048, 128)

    def forward(self, images, boxes):
        """images [B, 3, H, W], boxes [B, 1, 4] -> (res dict up to res4, [B, 1, 128] embeddings)."""
        feats = self.backbone(images)
        rois = roi_align_reference(feats["res4"], boxes[:, 0], 14, 1.0 / 16)
        x = self.roi_head.shared_head.layer4(rois).mean(dim=(2, 3))
        x = F.relu(self.roi_head.bbox_head.shared_fcs[0](x))
        return feats, F.normalize(self.roi_head.bbox_head.fc_cls(x), dim=-1)[:, None]
