"""InsLoc in plain PyTorch: the independent reference the differential tests check the JAX step against, and
the baseline `scripts/benchmark_torch.py` times. Written from ../shared/REFERENCE.md; imports nothing from
insloc_jax (only torch; torchvision's RoIAlign and NMS when asked for, for speed).

  models.py     ResNet, FPN with BN + 4conv-2fc box head, C4 res5 head, MoCo-v2 head, with the module names
                of the original's mmdetection checkpoint, so the project's mmdet export loads strictly
  roi_align.py  RoIAlign (aligned, adaptive sampling) from its definition, or torchvision's
  boxes.py      IoU, the box-augmentation anchors, greedy NMS, box augmentation from given draws
  step.py       one training step over D simulated devices (shuffle BN, InfoNCE, SGD, momentum, queues)
"""
