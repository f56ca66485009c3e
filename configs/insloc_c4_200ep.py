"""InsLoc R50-C4, 200 epochs on ImageNet: RoIAlign 14x14 on res4, res5 head, MLP 2048-2048-128 (our choice
of projection, as the original C4 config was never released), box augmentation on the one query box."""
from configs import base, methods


def get_config():
    return methods.apply(base.get_config(), "insloc_c4")
