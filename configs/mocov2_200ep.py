"""MoCo-v2 baseline, 200 epochs on ImageNet: whole-image views (RandomResizedCrop 224), global pool +
MLP 2048-2048-128, no boxes, plain (not Nesterov) momentum SGD."""
from configs import base, methods


def get_config():
    return methods.apply(base.get_config(), "mocov2")
