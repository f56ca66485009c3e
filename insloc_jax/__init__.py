"""insloc_jax: InsLoc self-supervised detection pretraining in JAX/Flax.

Subpackages:
  ops:    RoIAlign and box operations (IoU, anchors, NMS, box augmentation), pure JAX.
  models: torchvision-named ResNet, FPN, InsLoc heads and encoders (Flax linen).
  data:   datasets, copy-paste composition, augmentation and the input pipeline (TensorFlow).
"""

__version__ = "0.1.0"
