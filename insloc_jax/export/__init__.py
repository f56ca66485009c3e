"""Export encoder weights as PyTorch files: torchvision (a ResNet, or a whole Mask R-CNN state dict with
`torchvision_detection`), mmdetection (the original repo) and detectron2.

  names.py    the rename tables (data): flax module paths -> each format's names, per detector layout
  convert.py  flax variables -> {name: array} state dicts in PyTorch layout, by those tables
  files.py    the one atomic writer and the file kinds (.pth of tensors, detectron2 .pkl)
  run.py      `python -m insloc_jax.export`: a run's checkpoint -> a file
"""
from insloc_jax.export.convert import encoder_arch, state_dict, to_detectron2, to_mmdet, to_torchvision
from insloc_jax.export.files import FILES, FORMATS, save_detectron2_pkl, save_pth, write, write_atomic
from insloc_jax.export.run import export_run, main

__all__ = ["encoder_arch", "state_dict", "to_detectron2", "to_mmdet", "to_torchvision", "FILES", "FORMATS",
           "save_detectron2_pkl", "save_pth", "write", "write_atomic", "export_run", "main"]
