"""InsLoc R50-C4, 400 epochs on ImageNet."""
from configs import insloc_c4_200ep


def get_config():
    c = insloc_c4_200ep.get_config()
    c.optim.epochs = 400
    return c
