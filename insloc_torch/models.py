"""The three encoders in plain torch, at any ResNet depth and width.

Module names follow the original's mmdetection checkpoint (`backbone.layer1.0.conv1`, `neck.lateral_convs.0.
conv`, `roi_head.bbox_head.shared_fcs.0`, ...), so the project's mmdet export loads with strict=True. Images
are NCHW; every forward returns L2-normalised embeddings [B, L, D]. The box encoders take their RoIAlign as
an argument (`roi_align.py`: the definition's, or torchvision's kernel for speed).
"""
import torch
import torch.nn.functional as F
from torch import nn

from insloc_torch.roi_align import roi_align as reference_roi_align

STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3))}
FPN_STRIDES = (4, 8, 16, 32)


def conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.downsample = (nn.Sequential(conv(cin, planes, 1, stride), nn.BatchNorm2d(planes))
                           if stride != 1 or cin != planes else None)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        # The stride sits on the 3x3 convolution (torchvision's ResNet v1.5, detectron2's STRIDE_IN_1X1 False).
        self.conv1, self.bn1 = conv(cin, planes, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv(planes, planes * 4, 1), nn.BatchNorm2d(planes * 4)
        self.downsample = (nn.Sequential(conv(cin, planes * 4, 1, stride), nn.BatchNorm2d(planes * 4))
                           if stride != 1 or cin != planes * 4 else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def stage(kind, cin, planes, blocks, stride):
    """(nn.Sequential of `blocks` residual blocks, output channels)."""
    block = Basic if kind == "basic" else Bottleneck
    layers = [block(cin, planes, stride)]
    layers += [block(planes * block.expansion, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers), planes * block.expansion


class ResNet(nn.Module):
    """The ResNet trunk: stem, then `stages` residual stages of width * 2^i; forward -> {"res2": ..}."""

    def __init__(self, depth, width, stages=4):
        super().__init__()
        kind, blocks = STAGES[depth]
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stages, self.channels, cin = stages, [], width
        for i in range(stages):
            layer, cin = stage(kind, cin, width * 2**i, blocks[i], 1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", layer)
            self.channels.append(cin)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = {}
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
            out[f"res{i + 2}"] = x
        return out


class ConvBN(nn.Module):
    """mmcv's ConvModule with BN: `conv` (no bias), `bn`, optional ReLU."""

    def __init__(self, cin, cout, k, relu):
        super().__init__()
        self.conv, self.bn, self.relu = conv(cin, cout, k), nn.BatchNorm2d(cout), relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class FPNEncoder(nn.Module):
    """ResNet -> FPN with BN -> RoIAlign 7x7 of level l's box on P(l+2) -> shared 4conv-2fc head, [B, 4, D]."""

    levels = 4

    def __init__(self, depth, width, fpn_dim, conv_dim, fc_dim, dim, convs=4, fcs=2, roi=7,
                 roi_align=reference_roi_align):
        super().__init__()
        self.backbone = ResNet(depth, width)
        self.neck = nn.Module()
        self.neck.lateral_convs = nn.ModuleList(ConvBN(c, fpn_dim, 1, False) for c in self.backbone.channels)
        self.neck.fpn_convs = nn.ModuleList(ConvBN(fpn_dim, fpn_dim, 3, False) for _ in self.backbone.channels)
        head = nn.Module()
        head.shared_convs = nn.ModuleList(ConvBN(fpn_dim if i == 0 else conv_dim, conv_dim, 3, True)
                                          for i in range(convs))
        head.shared_fcs = nn.ModuleList(nn.Linear(conv_dim * roi * roi if i == 0 else fc_dim, fc_dim)
                                        for i in range(fcs))
        head.fc_cls = nn.Linear(fc_dim, dim)
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = head
        self.roi, self.roi_align = roi, roi_align

    def pyramid(self, images):
        """images [B, 3, H, W] -> ({"res2".."res5": ResNet maps}, [P2, P3, P4, P5])."""
        feats = self.backbone(images)
        laterals = [m(feats[f"res{i + 2}"]) for i, m in enumerate(self.neck.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: nearest upsampling, added
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:])
        return feats, [m(x) for m, x in zip(self.neck.fpn_convs, laterals)]

    def forward(self, images, boxes):
        _, pyramid = self.pyramid(images)
        rois = torch.stack([self.roi_align(p, boxes[:, i], self.roi, 1.0 / s)
                            for i, (p, s) in enumerate(zip(pyramid, FPN_STRIDES))], 1)  # [B, 4, C, 7, 7]
        x = rois.flatten(0, 1)  # image-major [B * 4, C, 7, 7]: every RoI of the batch in one BN batch
        head = self.roi_head.bbox_head
        for m in head.shared_convs:
            x = m(x)
        x = x.flatten(1)
        for m in head.shared_fcs:
            x = F.relu(m(x))
        return F.normalize(head.fc_cls(x).view(images.shape[0], 4, -1), dim=-1)


class C4Encoder(nn.Module):
    """ResNet to res4 -> RoIAlign 14x14 -> res5 -> average pool -> MLP, [B, 1, D]."""

    levels = 1

    def __init__(self, depth, width, mlp_dim, dim, roi=14, roi_align=reference_roi_align):
        super().__init__()
        self.backbone = ResNet(depth, width, stages=3)
        kind, blocks = STAGES[depth]
        self.roi_head = nn.Module()
        self.roi_head.shared_head = nn.Module()
        self.roi_head.shared_head.layer4, c5 = stage(kind, self.backbone.channels[-1], width * 8, blocks[3], 2)
        self.roi_head.bbox_head = nn.Module()
        self.roi_head.bbox_head.shared_fcs = nn.ModuleList([nn.Linear(c5, mlp_dim)])
        self.roi_head.bbox_head.fc_cls = nn.Linear(mlp_dim, dim)
        self.roi, self.roi_align = roi, roi_align

    def forward(self, images, boxes):
        rois = self.roi_align(self.backbone(images)["res4"], boxes[:, 0], self.roi, 1.0 / 16)
        x = self.roi_head.shared_head.layer4(rois).mean(dim=(2, 3))
        x = F.relu(self.roi_head.bbox_head.shared_fcs[0](x))
        return F.normalize(self.roi_head.bbox_head.fc_cls(x), dim=-1)[:, None]


class MoCoEncoder(nn.Module):
    """MoCo-v2: ResNet -> global average pool of res5 -> fc-ReLU-fc, [B, 1, D]; boxes are ignored."""

    levels = 1

    def __init__(self, depth, width, mlp_dim, dim):
        super().__init__()
        self.backbone = ResNet(depth, width)
        self.projection = nn.Module()
        self.projection.fc1 = nn.Linear(self.backbone.channels[-1], mlp_dim)
        self.projection.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, images, boxes):
        x = self.backbone(images)["res5"].mean(dim=(2, 3))
        return F.normalize(self.projection.fc2(F.relu(self.projection.fc1(x))), dim=-1)[:, None]


def init_weights(encoder: nn.Module) -> nn.Module:
    """REFERENCE initialisation: convs normal(0, sqrt(2 / (k * k * out))), fcs Xavier-uniform with zero bias.

    The JAX model's initialisation; torch's default init would start the baseline from other weights.
    """
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return encoder
