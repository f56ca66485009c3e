"""MoCo-v2 baseline, 200 epochs on ImageNet: whole-image views (RandomResizedCrop 224), global pool +
MLP 2048-2048-128, no boxes, plain (not Nesterov) momentum SGD."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.arch = "moco"
    c.data.mode = "moco"
    c.box_aug.levels = ()
    c.optim.nesterov = False
    return c
