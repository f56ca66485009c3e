"""MoCo-v2 baseline, 800 epochs on ImageNet."""
from configs import mocov2_200ep


def get_config():
    c = mocov2_200ep.get_config()
    c.optim.epochs = 800
    return c
