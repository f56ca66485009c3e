"""InsLoc R50-FPN, 200 epochs on ImageNet (the shipped configuration of the original code)."""
from configs import base


def get_config():
    return base.get_config()
