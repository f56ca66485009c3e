"""torchvision Mask R-CNN detectors for fine-tuning: R-FPN and R-C4 with a ResNet of any depth and width.

Both are `torchvision.models.detection.MaskRCNN` and load `python -m insloc_jax.export --format
torchvision_detection --arch fpn|c4` by name (REFERENCE sections 6 and 7):

  fpn: `backbone.body` the ResNet (torchvision names: conv1, bn1, layer1..layer4), `backbone.fpn` a
       FeaturePyramidNetwork with BatchNorm (P2..P5, plus a max-pooled P6 for the RPN),
       `roi_heads.box_head` FastRCNNConvFCHead 4 x (3x3 conv + BN + ReLU) -> fc + ReLU (-> BatchNorm1d, the
       original's `fc_extra_norm`), and torchvision's 4-conv mask head with BatchNorm.
  c4:  `backbone.body` the ResNet up to layer3 (res4, stride 16, the RPN's one level),
       `roi_heads.box_head.layer4` res5 on 14x14 RoIs, then global average pooling; the mask head
       upsamples the same res5 output (detectron2's Res5ROIHeads).

The ResNet puts the stride in its 3x3 convs (torchvision's, = detectron2 `STRIDE_IN_1X1: False`) and every
BatchNorm trains (the paper fine-tunes with SyncBN; none is frozen). Inputs are RGB in [0, 1], normalised
by MaskRCNN's transform with torchvision's ImageNet mean / std, which is the pretraining's normalisation
((x * 255 - 123.675) / 58.395 = (x - 0.485) / 0.229, data/augment.py). Layers the export does not hold keep
torchvision's default initialisation; the architecture is the same whatever the weights come from.
"""
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

# torchvision's pooler computing the same numbers as separable matmuls: its own kernel's backward is a
# single-threaded scatter that took a quarter (FPN) to a third (C4) of a CPU iteration (finetune/roi_pool.py).
from insloc_jax.finetune.roi_pool import MultiScaleRoIAlign

ARCHS = ("fpn", "c4")
# depth -> (torchvision block, blocks per stage), as insloc_jax.models.resnet.STAGE_BLOCKS.
STAGES = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
          50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}
FPN_LEVELS = ("0", "1", "2", "3")  # P2..P5 as BackboneWithFPN names them; "pool" (P6) feeds the RPN only
C4_MASK_DIM = 256  # detectron2's ROI_MASK_HEAD.CONV_DIM: the deconv's channels in the C4 mask head
# RoIHeads settings that the config does not expose: torchvision's (and detectron2's) defaults.
ROI_DEFAULTS = dict(fg_iou_thresh=0.5, bg_iou_thresh=0.5, positive_fraction=0.25, bbox_reg_weights=None,
                    nms_thresh=0.5)


def resnet(depth: int, width: int) -> nn.Sequential:
    """torchvision's ResNet trunk (no avgpool / fc) with base width `width` instead of its fixed 64.

    Args:
      depth: 18, 34, 50 or 101.
      width: channels of the stem and of layer1's blocks (layer i has width * 2**(i-1) planes).

    Returns:
      Sequential conv1, bn1, relu, maxpool, layer1..layer4: [N, 3, H, W] -> [N, C5, H/32, W/32], with
      torchvision's BasicBlock / Bottleneck (stride in the 3x3 conv) and its initialisation.
    """
    if depth not in STAGES:
        raise ValueError(f"config.model.depth must be one of {sorted(STAGES)}, got {depth}")
    block, blocks = STAGES[depth]
    layers = OrderedDict(conv1=nn.Conv2d(3, width, 7, 2, 3, bias=False), bn1=nn.BatchNorm2d(width),
                         relu=nn.ReLU(inplace=True), maxpool=nn.MaxPool2d(3, 2, 1))
    channels = width
    for i, count in enumerate(blocks):
        layers[f"layer{i + 1}"] = _stage(block, channels, width * 2**i, count, 1 if i == 0 else 2)
        channels = width * 2**i * block.expansion
    trunk = nn.Sequential(layers)
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):  # torchvision's ResNet init; BatchNorm keeps weight 1, bias 0
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return trunk


def _stage(block, in_channels: int, planes: int, count: int, stride: int) -> nn.Sequential:
    """One torchvision `layerN`: `count` blocks, the first strided with a `downsample` 1x1 conv + BN."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                   nn.BatchNorm2d(out_channels))
    blocks = [block(in_channels, planes, stride, downsample)]
    blocks += [block(out_channels, planes) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


def stage_channels(depth: int, width: int) -> List[int]:
    """Output channels of layer1..layer4, e.g. [256, 512, 1024, 2048] for ResNet-50 of width 64."""
    block, _ = STAGES[depth]
    return [width * 2**i * block.expansion for i in range(4)]


class C4Backbone(nn.Module):
    """conv1..layer3 as `body` (torchvision names): [N, 3, H, W] -> {"0": res4 [N, C4, H/16, W/16]}."""

    def __init__(self, trunk: nn.Sequential, out_channels: int):
        super().__init__()
        self.body = IntermediateLayerGetter(trunk, {"layer3": "0"})  # stops before layer4
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.body(x)


class Res5Head(nn.Module):
    """The C4 box head: res5 (`layer4`, stride 2 in its first block), then global average pooling."""

    def __init__(self, layer4: nn.Sequential):
        super().__init__()
        self.layer4 = layer4

    def res5(self, rois: torch.Tensor) -> torch.Tensor:
        """[R, C4, 14, 14] RoI features -> [R, C5, 7, 7]."""
        return self.layer4(rois)

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        """[R, C4, 14, 14] -> [R, C5] box features."""
        return self.layer4(rois).mean(dim=(2, 3))


class C4RoIHeads(RoIHeads):
    """RoIHeads whose box and mask branches share one res5, as detectron2's Res5ROIHeads.

    res5 lives once, in `box_head`; the mask branch is only `mask_predictor` (2x2 stride-2 deconv to 14x14,
    ReLU, 1x1 conv per class) applied to res5's 7x7 output. In training the mask branch reuses the res5
    output of the sampled foreground RoIs instead of running res5 again: a second res5 pass (a mask head
    that calls the box head's res5) would normalise with the foreground RoIs' own BatchNorm statistics and
    update res5's running statistics twice per iteration, which detectron2 does not do. At inference res5
    runs again on the detected boxes, as detectron2 does.
    """

    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    def forward(self, features, proposals, image_shapes, targets=None):
        """Box and mask losses (training) or detections with masks (eval).

        Args:
          features: {"0": res4 [N, C4, H/16, W/16]}.
          proposals: per image [P_i, 4] boxes (xyxy, input pixels).
          image_shapes: per image (height, width) after the transform.
          targets: per image {"boxes", "labels", "masks"} (training only).

        Returns:
          (detections, losses): training ([], {"loss_classifier", "loss_box_reg", "loss_mask"}); eval
          (per image {"boxes", "labels", "scores", "masks" [D, 1, 14, 14]}, {}).
        """
        if not self.training:
            return self._detect(features, proposals, image_shapes), {}
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        res5 = self.box_head.res5(self.box_roi_pool(features, proposals, image_shapes))  # [R, C5, 7, 7]
        class_logits, box_regression = self.box_predictor(res5.mean(dim=(2, 3)))
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        positive = [label > 0 for label in labels]
        mask_logits = self.mask_predictor(res5[torch.cat(positive)])  # [R_fg, classes, 14, 14]
        loss_mask = maskrcnn_loss(
            mask_logits, [p[k] for p, k in zip(proposals, positive)], [t["masks"] for t in targets],
            [t["labels"] for t in targets], [m[k] for m, k in zip(matched_idxs, positive)])
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}

    def _detect(self, features, proposals, image_shapes) -> List[Dict[str, torch.Tensor]]:
        """Scored, NMS-ed boxes per image, then the masks of the kept boxes."""
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))  # [R, C5]
        class_logits, box_regression = self.box_predictor(box_features)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        res5 = self.box_head.res5(self.box_roi_pool(features, boxes, image_shapes))  # [D, C5, 7, 7]
        masks = maskrcnn_inference(self.mask_predictor(res5), labels)
        return [{"boxes": b, "labels": c, "scores": s, "masks": m}
                for b, c, s, m in zip(boxes, labels, scores, masks)]


def fpn_box_head(fpn_dim: int, head_convs: int, head_conv_dim: int, head_fc_dim: int,
                 extra_norm: bool) -> FastRCNNConvFCHead:
    """[R, fpn_dim, 7, 7] -> [R, head_fc_dim]: convs `{i}.0` / `{i}.1`, Flatten, fc `{head_convs + 1}`, ReLU,
    and with `extra_norm` a BatchNorm1d appended after it (so the names before it stay torchvision's)."""
    head = FastRCNNConvFCHead((fpn_dim, 7, 7), [head_conv_dim] * head_convs, [head_fc_dim],
                              norm_layer=nn.BatchNorm2d)
    if extra_norm:
        head.append(nn.BatchNorm1d(head_fc_dim))
    return head


def _fpn_parts(trunk, channels, num_classes, m) -> Tuple[nn.Module, AnchorGenerator, RoIHeads]:
    """Backbone + FPN, anchors (one size per level P2..P6) and RoI heads of the R-FPN detector."""
    sizes = tuple(m["anchor_sizes"])
    if len(sizes) != len(FPN_LEVELS) + 1:
        raise ValueError(f"config.model.anchor_sizes needs one size per level P2..P6 (5) for arch fpn, got {sizes}")
    backbone = BackboneWithFPN(trunk, {f"layer{i + 1}": name for i, name in enumerate(FPN_LEVELS)}, channels,
                               m["fpn_dim"], extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
    anchors = AnchorGenerator(tuple((s,) for s in sizes), (tuple(m["aspect_ratios"]),) * len(sizes))
    scale = m["roi_canonical_scale"]
    box_pool = MultiScaleRoIAlign(list(FPN_LEVELS), 7, 2, canonical_scale=scale)
    box_head = fpn_box_head(m["fpn_dim"], m["head_convs"], m["head_conv_dim"], m["head_fc_dim"], m["extra_norm"])
    heads = RoIHeads(
        box_pool, box_head, FastRCNNPredictor(m["head_fc_dim"], num_classes), **_roi_settings(m),
        mask_roi_pool=MultiScaleRoIAlign(list(FPN_LEVELS), 14, 2, canonical_scale=scale),
        mask_head=MaskRCNNHeads(m["fpn_dim"], [m["mask_conv_dim"]] * 4, 1, norm_layer=nn.BatchNorm2d),
        mask_predictor=MaskRCNNPredictor(m["mask_conv_dim"], m["mask_conv_dim"], num_classes))
    return backbone, anchors, heads


def _c4_parts(trunk, channels, num_classes, m) -> Tuple[nn.Module, AnchorGenerator, RoIHeads]:
    """res4 backbone, anchors (every size on res4) and res5 RoI heads of the R-C4 detector."""
    backbone = C4Backbone(trunk, channels[2])
    anchors = AnchorGenerator((tuple(m["anchor_sizes"]),), (tuple(m["aspect_ratios"]),))
    heads = C4RoIHeads(
        MultiScaleRoIAlign(["0"], 14, 2), Res5Head(trunk.layer4), FastRCNNPredictor(channels[3], num_classes),
        **_roi_settings(m), mask_predictor=MaskRCNNPredictor(channels[3], C4_MASK_DIM, num_classes))
    return backbone, anchors, heads


def _roi_settings(m) -> dict:
    return dict(ROI_DEFAULTS, batch_size_per_image=m["roi_batch_per_image"], score_thresh=m["score_thresh"],
                detections_per_img=m["detections_per_image"])


def build_detector(arch: str, num_classes: int, **model_fields) -> MaskRCNN:
    """A Mask R-CNN for fine-tuning, new layers initialised from torch's global RNG.

    Args:
      arch: "fpn" or "c4".
      num_classes: classes including the background (COCO: 81).
      **model_fields: the fields of configs/finetune/base.py's `model` section (depth, width, fpn_dim,
        head_convs, head_conv_dim, head_fc_dim, extra_norm, mask_conv_dim, min_size, max_size,
        anchor_sizes, aspect_ratios, roi_canonical_scale, rpn_*, roi_batch_per_image,
        detections_per_image, score_thresh).

    Returns:
      torchvision MaskRCNN taking a list of [3, H, W] RGB images in [0, 1] (and targets in training).
    """
    if arch not in ARCHS:
        raise ValueError(f"config.arch must be one of {ARCHS}, got {arch!r}")
    m = model_fields
    trunk = resnet(m["depth"], m["width"])
    channels = stage_channels(m["depth"], m["width"])
    parts = _fpn_parts if arch == "fpn" else _c4_parts
    backbone, anchors, heads = parts(trunk, channels, num_classes, m)
    model = MaskRCNN(
        backbone, None, min_size=m["min_size"], max_size=m["max_size"], rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=m["rpn_pre_nms_train"], rpn_post_nms_top_n_train=m["rpn_post_nms_train"],
        rpn_pre_nms_top_n_test=m["rpn_pre_nms_test"], rpn_post_nms_top_n_test=m["rpn_post_nms_test"],
        rpn_batch_size_per_image=m["rpn_batch_per_image"], box_roi_pool=heads.box_roi_pool,
        box_head=heads.box_head, box_predictor=heads.box_predictor, mask_roi_pool=heads.box_roi_pool,
        mask_head=nn.Identity(), mask_predictor=heads.mask_predictor)
    # MaskRCNN always builds a plain RoIHeads around the modules it is given; ours (built above from the
    # same modules, with the config's settings) takes its place, so both archs set up their RoI heads the
    # same way and the C4 one can share res5. Only the mask head placeholder (no parameters) is new here.
    model.roi_heads = heads
    return model
