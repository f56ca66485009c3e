"""Fine-tuning an export in torchvision: Mask R-CNN R-FPN / R-C4 trained and scored on a COCO-format set.

Importing this package imports nothing heavy: the command checks its dependencies (deps.py) before the
modules that need torch and torchvision (models.py, weights.py, ...) are imported.
"""
