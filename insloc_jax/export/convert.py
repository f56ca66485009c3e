"""Flax variables of an `Encoder` -> {PyTorch name: numpy array} state dicts, by the tables of `names.py`.

The conversion is a rename (the tables) plus one layout rule:

  conv kernel [kh, kw, in, out] (HWIO) -> `weight` [out, in, kh, kw] (OIHW)
  dense kernel [in, out]              -> `weight` [out, in]
  BatchNorm scale / bias / mean / var -> `weight` / `bias` / `running_mean` / `running_var`, plus
                                         `num_batches_tracked` (int64 scalar)

`running_var` is exported as stored: our BatchNorm already keeps torch's unbiased running variance
(`models/norm.py`), so nothing is converted here.

`arch` names the PyTorch model the file is for ("fpn" or "c4"). The ResNet always goes out complete (for
a c4 encoder its res5 lives in the RoI head); the FPN neck and box head go out only when the variables
come from an fpn encoder, the C4 projection only to the mmdet file (detectron2 and torchvision's Mask R-CNN
have no place for it).
A moco encoder thus exports its backbone into either layout.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from insloc_jax.export.names import LAYOUTS, Layout, rename

StateDict = Dict[str, np.ndarray]
Modules = Dict[str, Dict[str, np.ndarray]]  # {"a/b/c" flax module path: {torch leaf name: array}}
FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                      "var": "running_var"}
LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _torch_leaf(name: str, value: Any) -> Tuple[str, np.ndarray]:
    """One flax leaf -> (torch leaf name, array in torch layout)."""
    array = np.asarray(value)
    if name == "kernel" and array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif name == "kernel" and array.ndim == 2:
        array = array.T  # (in, out) -> (out, in)
    return FLAX_TO_TORCH_LEAF[name], np.ascontiguousarray(array)


def _modules(params: Mapping, stats: Mapping, num_batches_tracked: int, prefix: str = "") -> Modules:
    """Flattens a flax subtree into {"a/b/c" module path: {torch leaf: array}}, in definition order."""
    modules: Modules = {}
    leaves = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            child = f"{prefix}{key}"
            modules.update(_modules(value, stats.get(key, {}), num_batches_tracked, child + "/"))
        else:
            name, array = _torch_leaf(key, value)
            leaves[name] = array
    for key in ("mean", "var"):
        if key in stats:
            name, array = _torch_leaf(key, stats[key])
            leaves[name] = array
    if "running_mean" in leaves:
        leaves["num_batches_tracked"] = np.array(num_batches_tracked, dtype=np.int64)
    if leaves:
        modules[prefix.rstrip("/")] = leaves
    return modules


def encoder_arch(variables: Mapping) -> str:
    """Which Encoder arch produced `variables`: "fpn", "c4" or "moco"."""
    params = variables["params"]
    if "neck" in params:
        return "fpn"
    if "head" in params and "layer4" in params["head"]:
        return "c4"
    if "projection" in params:
        return "moco"
    raise ValueError("variables are not those of an insloc_jax Encoder (no neck, head or projection)")


def _backbone_modules(variables: Mapping, num_batches_tracked: int) -> Modules:
    """torchvision-named ResNet modules ("conv1", "layer1/0/conv1", ...), res5 included for c4."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    modules = _modules(params["backbone"], stats.get("backbone", {}), num_batches_tracked)
    if "layer4" in params.get("head", {}):
        head_stats = stats.get("head", {}).get("layer4", {})
        modules.update(_modules(params["head"]["layer4"], head_stats, num_batches_tracked, "layer4/"))
    return modules


def _head_modules(variables: Mapping, num_batches_tracked: int) -> Modules:
    """Neck / head / projection modules keyed by their full flax path ("neck/lateral_convs_0/conv")."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    rest = {k: v for k, v in params.items() if k != "backbone"}
    rest_stats = {k: v for k, v in stats.items() if k != "backbone"}
    return {path: leaves for path, leaves in _modules(rest, rest_stats, num_batches_tracked).items()
            if not path.startswith("head/layer4")}


def head_values(variables: Mapping) -> Dict[str, int]:
    """The numbers the rename templates may name: {"head_convs": convs of the FPN box head (0 if none)}."""
    head = variables["params"].get("head", {})
    return {"head_convs": sum(1 for name in head if name.startswith("shared_convs_"))}


def _resnet_name(path: str, layout: Layout) -> Optional[str]:
    name = rename(path, layout.resnet)
    return None if name is None else rename(name, layout.place)


def state_dict(variables: Mapping, fmt: str, arch: Optional[str] = None, num_batches_tracked: int = 0) -> StateDict:
    """The weights of an Encoder as one file format names them.

    Args:
      variables: flax variables {"params", "batch_stats"} of an Encoder (any arch).
      fmt: "torchvision", "mmdet", "detectron2" or "torchvision_detection".
      arch: the detector layout, "fpn" or "c4" (mmdet, detectron2, torchvision_detection); None for
        torchvision.
      num_batches_tracked: value of every BatchNorm's `num_batches_tracked` (e.g. the training step).

    Returns:
      {name: numpy array} in PyTorch layout, in the model's definition order.
    """
    if fmt != "torchvision" and arch not in ("fpn", "c4"):
        raise ValueError(f"export arch must be 'fpn' or 'c4' (the PyTorch model layout), got {arch!r}")
    layout = LAYOUTS[(fmt, arch if fmt != "torchvision" else None)]
    named = [(_resnet_name(path, layout), leaves)
             for path, leaves in _backbone_modules(variables, num_batches_tracked).items()]
    heads = layout.heads.get(encoder_arch(variables)) if layout.heads else None  # torchvision: a bare ResNet too
    if heads:
        values = head_values(variables)
        named += [(rename(path, heads, values), leaves)
                  for path, leaves in _head_modules(variables, num_batches_tracked).items()]
    return {f"{name}.{leaf}": leaves[leaf]
            for name, leaves in named if name is not None
            for leaf in sorted(leaves, key=LEAF_ORDER.index)}


def to_torchvision(variables: Mapping, num_batches_tracked: int = 0) -> StateDict:
    """torchvision `resnet{18,34,50,101}` state dict without `fc` (load with strict=False or drop fc):
    {"conv1.weight": [64, 3, 7, 7], "bn1.weight": [64], ..., "layer4.2.bn3.num_batches_tracked": []}."""
    return state_dict(variables, "torchvision", None, num_batches_tracked)


def to_mmdet(variables: Mapping, arch: str, num_batches_tracked: int = 0) -> StateDict:
    """The original InsLoc (mmdetection 2.x) checkpoint names for the query encoder.

    fpn: `backbone.*` (torchvision names), `neck.lateral_convs.{i}.conv|bn`, `neck.fpn_convs.{i}.conv|bn`,
         `roi_head.bbox_head.shared_convs.{i}.conv|bn`, `roi_head.bbox_head.shared_fcs.{i}`,
         `roi_head.bbox_head.fc_cls` (the 128-d projection).
    c4:  `backbone.*` up to `layer3`, `roi_head.shared_head.layer4.*`, and the projection MLP as
         `roi_head.bbox_head.shared_fcs.0` (2048 -> 2048) and `roi_head.bbox_head.fc_cls` (-> 128).
    """
    return state_dict(variables, "mmdet", arch, num_batches_tracked)


def to_detectron2(variables: Mapping, arch: str, num_batches_tracked: int = 0) -> StateDict:
    """detectron2 names (REFERENCE section 6) for an R-FPN or R-C4 model with STRIDE_IN_1X1 False: the
    `model` entry of a detectron2 weight file.

    fpn: `backbone.bottom_up.stem.conv1(.norm)`, `backbone.bottom_up.res{2..5}.{b}.conv{k}(.norm)` and
         `.shortcut(.norm)`, `backbone.fpn_lateral{2..5}(.norm)`, `backbone.fpn_output{2..5}(.norm)`,
         `roi_heads.box_head.conv{1..4}(.norm)`, `roi_heads.box_head.fc1`.
    c4:  `backbone.stem.*`, `backbone.res{2..4}.*`, `roi_heads.res5.*`; the projection is dropped.
    """
    return state_dict(variables, "detectron2", arch, num_batches_tracked)
