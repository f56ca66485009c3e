"""InsLoc R50-FPN, 400 epochs on ImageNet."""
from configs import base


def get_config():
    c = base.get_config()
    c.optim.epochs = 400
    return c
