"""An InsLoc training step in plain PyTorch, written from ../shared/REFERENCE.md and the original algorithm.

Test code, never shipped, sharing no code with insloc_jax: `models.py` holds the encoders (ResNet, FPN with
BN and the 4conv-2fc box head, the C4 res5 head, the MoCo-v2 global head) with the module names of the
original's mmdetection checkpoint, `step.py` the step (box augmentation, shuffle BN, InfoNCE, SGD, momentum
update, queue).
"""
