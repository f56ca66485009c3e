"""The rename tables: flax module paths of an `Encoder` -> PyTorch module names, per file format and layout.

Data only. A table is an ordered tuple of rules (regex, template): the first regex that matches a whole flax
module path ("layer1/0/downsample/1", "neck/lateral_convs_2/bn") gives the name; a path no rule matches is
left out of the file. Templates are `str.format`-like: `{g}` is the regex group g with "/" written as ".",
`{g+K}` adds K to a numeric group (torchvision's layer1 is detectron2's res2, the neck's level 0 is P2).
A field that names no group of the regex reads a number the conversion supplies (`head_values` in
convert.py): `{head_convs+1}` is the index of the layer after the box head's convs and their Flatten.

A layout names a file in three steps, each a table:
  resnet: the ResNet's module names (torchvision's, or detectron2's stem/res2..res5);
  place:  where the ResNet goes in the detector (backbone., roi_head.shared_head. for C4's res5, ...);
  heads:  the FPN neck / box head / C4 projection, per architecture of the exported encoder (an encoder of
          another architecture exports its ResNet only).
"""
import dataclasses
import re
from typing import Mapping, Optional, Tuple

Rules = Tuple[Tuple[str, str], ...]

SAME: Rules = ((r"(?P<m>.*)", "{m}"),)

DETECTRON2_RESNET: Rules = (
    (r"conv1", "stem.conv1"),
    (r"bn1", "stem.conv1.norm"),
    (r"layer(?P<s>\d)/(?P<b>\d+)/conv(?P<k>\d)", "res{s+1}.{b}.conv{k}"),
    (r"layer(?P<s>\d)/(?P<b>\d+)/bn(?P<k>\d)", "res{s+1}.{b}.conv{k}.norm"),
    (r"layer(?P<s>\d)/(?P<b>\d+)/downsample/0", "res{s+1}.{b}.shortcut"),
    (r"layer(?P<s>\d)/(?P<b>\d+)/downsample/1", "res{s+1}.{b}.shortcut.norm"),
)

# The original InsLoc checkpoint (mmdetection 2.x names).
MMDET_FPN_HEAD: Rules = (
    (r"neck/(?P<g>\w+)_(?P<i>\d+)/(?P<m>\w+)", "neck.{g}.{i}.{m}"),  # neck.lateral_convs.0.conv
    (r"head/(?P<g>shared_convs)_(?P<i>\d+)/(?P<m>\w+)", "roi_head.bbox_head.{g}.{i}.{m}"),
    (r"head/(?P<g>shared_fcs)_(?P<i>\d+)", "roi_head.bbox_head.{g}.{i}"),
    (r"head/fc_cls", "roi_head.bbox_head.fc_cls"),  # the 128-d projection
)
# The C4 projection was never published: the FPN head's names for its first and last fc.
MMDET_C4_HEAD: Rules = (
    (r"head/projection/fc1", "roi_head.bbox_head.shared_fcs.0"),
    (r"head/projection/fc2", "roi_head.bbox_head.fc_cls"),
)

# detectron2 keeps the FPN neck and the box head's convs and first fc; its second fc and the projection
# have no place there.
DETECTRON2_FPN_HEAD: Rules = (
    (r"neck/lateral_convs_(?P<i>\d+)/conv", "backbone.fpn_lateral{i+2}"),
    (r"neck/lateral_convs_(?P<i>\d+)/bn", "backbone.fpn_lateral{i+2}.norm"),
    (r"neck/fpn_convs_(?P<i>\d+)/conv", "backbone.fpn_output{i+2}"),
    (r"neck/fpn_convs_(?P<i>\d+)/bn", "backbone.fpn_output{i+2}.norm"),
    (r"head/shared_convs_(?P<i>\d+)/conv", "roi_heads.box_head.conv{i+1}"),
    (r"head/shared_convs_(?P<i>\d+)/bn", "roi_heads.box_head.conv{i+1}.norm"),
    (r"head/shared_fcs_0", "roi_heads.box_head.fc1"),
)


# torchvision's detection modules (insloc_jax/finetune/models.py builds them): FeaturePyramidNetwork's
# `inner_blocks` (laterals) / `layer_blocks` (outputs) and FastRCNNConvFCHead's Sequential, whose
# Conv2dNormActivation blocks hold the conv at `.0` and the norm at `.1`. The head's convs are followed by a
# Flatten, then the fc. The second fc and the projection have no place there.
TORCHVISION_DETECTION_FPN_HEAD: Rules = (
    (r"neck/lateral_convs_(?P<i>\d+)/conv", "backbone.fpn.inner_blocks.{i}.0"),
    (r"neck/lateral_convs_(?P<i>\d+)/bn", "backbone.fpn.inner_blocks.{i}.1"),
    (r"neck/fpn_convs_(?P<i>\d+)/conv", "backbone.fpn.layer_blocks.{i}.0"),
    (r"neck/fpn_convs_(?P<i>\d+)/bn", "backbone.fpn.layer_blocks.{i}.1"),
    (r"head/shared_convs_(?P<i>\d+)/conv", "roi_heads.box_head.{i}.0"),
    (r"head/shared_convs_(?P<i>\d+)/bn", "roi_heads.box_head.{i}.1"),
    (r"head/shared_fcs_0", "roi_heads.box_head.{head_convs+1}"),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one file format names one detector's weights (see the module docstring)."""

    resnet: Rules
    place: Rules
    heads: Mapping[str, Rules]


LAYOUTS = {
    ("torchvision", None): Layout(SAME, SAME, {}),
    ("mmdet", "fpn"): Layout(SAME, ((r"(?P<n>.*)", "backbone.{n}"),), {"fpn": MMDET_FPN_HEAD}),
    ("mmdet", "c4"): Layout(SAME, ((r"(?P<n>layer4\..*)", "roi_head.shared_head.{n}"),
                                   (r"(?P<n>.*)", "backbone.{n}")), {"c4": MMDET_C4_HEAD}),
    ("detectron2", "fpn"): Layout(DETECTRON2_RESNET, ((r"(?P<n>.*)", "backbone.bottom_up.{n}"),),
                                  {"fpn": DETECTRON2_FPN_HEAD}),
    ("detectron2", "c4"): Layout(DETECTRON2_RESNET, ((r"(?P<n>res5\..*)", "roi_heads.{n}"),
                                                     (r"(?P<n>.*)", "backbone.{n}")), {}),
    # torchvision Mask R-CNN; C4 has res5 (with its torchvision names) as its box head.
    ("torchvision_detection", "fpn"): Layout(SAME, ((r"(?P<n>.*)", "backbone.body.{n}"),),
                                             {"fpn": TORCHVISION_DETECTION_FPN_HEAD}),
    ("torchvision_detection", "c4"): Layout(SAME, ((r"(?P<n>layer4\..*)", "roi_heads.box_head.{n}"),
                                                   (r"(?P<n>.*)", "backbone.body.{n}")), {}),
}

_FIELD = re.compile(r"\{(?P<group>\w+)(?P<offset>[+-]\d+)?\}")


def rename(path: str, rules: Rules, values: Optional[Mapping[str, int]] = None) -> Optional[str]:
    """The name the first matching rule gives `path` ("a/b/c" flax module path), or None (not exported).

    Args:
      path: a flax module path.
      rules: the table.
      values: numbers the templates may name besides the regex groups (e.g. {"head_convs": 4}).
    """
    for pattern, template in rules:
        match = re.fullmatch(pattern, path)
        if match:
            return _FIELD.sub(lambda field: _value(match, field, values or {}), template)
    return None


def _value(match: re.Match, field: re.Match, values: Mapping[str, int]) -> str:
    group = field["group"]
    value = match.group(group).replace("/", ".") if group in match.groupdict() else str(values[group])
    return str(int(value) + int(field["offset"])) if field["offset"] else value
