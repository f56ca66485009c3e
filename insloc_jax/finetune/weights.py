"""Loading a `torchvision_detection` export into a detector of `models.build_detector`.

The file is a bare state dict of tensors (`python -m insloc_jax.export --format torchvision_detection`).
Every tensor in it must have a place of the same shape in the model, whatever is loaded: a file for the
other arch or other dimensions is an error that says how to fix it, never a silent partial load. The file
is only read (`torch.load(weights_only=True)`).
"""
import dataclasses
import os
from typing import Dict, Mapping, Tuple

import torch

TRANSFERS = ("all", "backbone")
BACKBONE = "backbone.body."  # what transfer="backbone" loads: the ResNet (for c4 without its res5)
C4_RES5 = "roi_heads.box_head.layer4."  # only a c4 export has res5 here (an fpn one has backbone.body.layer4)


class ExportNotFound(FileNotFoundError):
    """The export file does not exist; the message says how to write it."""


class ExportMismatch(ValueError):
    """The file is not an export this detector can load; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_export` did.

    Attributes:
      loaded_names: model tensors (parameters and buffers) set from the file.
      initialised_names: model tensors left at their new initialisation.
    """

    loaded_names: Tuple[str, ...]
    initialised_names: Tuple[str, ...]

    @property
    def loaded(self) -> int:
        return len(self.loaded_names)

    @property
    def initialised(self) -> int:
        return len(self.initialised_names)


def export_command(arch: str, path: str) -> str:
    """The command that writes the file a detector of `arch` loads."""
    return (f"python -m insloc_jax.export --workdir <pretraining workdir> --format torchvision_detection "
            f"--arch {arch} --output {path}")


def detector_arch(model: torch.nn.Module) -> str:
    """"fpn" or "c4": which of `models.build_detector`'s detectors `model` is."""
    return "fpn" if hasattr(model.backbone, "fpn") else "c4"


def read_export(path: str, arch: str) -> Dict[str, torch.Tensor]:
    """The state dict in `path`, checked to be a torchvision_detection export.

    Args:
      path: the file.
      arch: the detector's arch (for the messages).

    Returns:
      {name: tensor}.

    Raises:
      ExportNotFound: no such file.
      ExportMismatch: the file is not a bare state dict of detector tensors (mmdet, detectron2, torchvision
        ResNet files, or no PyTorch file at all).
    """
    if not os.path.isfile(path):
        raise ExportNotFound(f"{path} does not exist; write it with `{export_command(arch, path)}`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any reason torch cannot read it (a pickle of numpy arrays, not torch at all)
        raise _not_an_export(path, arch, f"torch.load failed: {str(error).splitlines()[0]}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = list(state)[:3] if isinstance(state, Mapping) else type(state).__name__
        raise _not_an_export(path, arch, f"not a bare state dict of tensors: it holds {held}")
    if not any(name.startswith(BACKBONE) for name in state):
        raise _not_an_export(path, arch, f"no {BACKBONE}* tensors; its first names are {list(state)[:3]}")
    return dict(state)


def _not_an_export(path: str, arch: str, why: str) -> ExportMismatch:
    return ExportMismatch(f"{path} is not a torchvision_detection export ({why}); write one with "
                          f"`{export_command(arch, path)}`")


def export_arch(state: Mapping[str, torch.Tensor]) -> str:
    """The arch an export was written for: "c4" when res5 is the box head, else "fpn"."""
    return "c4" if any(name.startswith(C4_RES5) for name in state) else "fpn"


def check_fits(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], arch: str,
               path: str) -> None:
    """Raises ExportMismatch unless every tensor of the file has a place of its shape in the model."""
    for name, tensor in state.items():
        if name not in model_state:
            raise _unexpected(name, export_arch(state), arch, path)
        if tensor.shape != model_state[name].shape:
            raise ExportMismatch(
                f"{path}: {name} has shape {tuple(tensor.shape)} in the file but {tuple(model_state[name].shape)} "
                "in the model; config.model (depth, width, fpn_dim, head dims) must match the pretraining config")


def _unexpected(name: str, written: str, arch: str, path: str) -> ExportMismatch:
    """The error for a file tensor the model lacks: another arch, or another head layout."""
    if written != arch:
        return ExportMismatch(
            f"{path} has {name}, which this {arch} detector does not have: the file was written for arch "
            f"{written}; re-export with `--arch {arch}` or set --config.arch={written}")
    return ExportMismatch(
        f"{path} has {name}, which this {arch} detector does not have; config.model (head_convs, ...) must "
        "match the pretraining config")


def load_export(model: torch.nn.Module, path: str, transfer: str = "all") -> LoadReport:
    """Loads a torchvision_detection export into a detector of `models.build_detector`.

    Args:
      model: the detector (its other tensors keep their initialisation).
      path: the export (.pth).
      transfer: "all" (every tensor of the file: backbone, and FPN + box head or res5) or "backbone"
        (`backbone.body.*` only).

    Returns:
      LoadReport: the names loaded and the names left newly initialised (`num_batches_tracked` counts as a
      tensor like any other).

    Raises:
      ExportNotFound, ExportMismatch: see `read_export` and `check_fits`.
    """
    if transfer not in TRANSFERS:
        raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
    arch = detector_arch(model)
    state = read_export(path, arch)
    model_state = model.state_dict()
    check_fits(state, model_state, arch, path)
    chosen = {name: tensor for name, tensor in state.items() if transfer == "all" or name.startswith(BACKBONE)}
    model.load_state_dict(chosen, strict=False)
    return LoadReport(tuple(chosen), tuple(name for name in model_state if name not in chosen))
