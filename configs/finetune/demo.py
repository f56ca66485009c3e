"""The miniature fine-tune: Mask R-CNN R18(width 32)-FPN on the embedded detection set (1,000 train and 500
val images of 128 pixels), with the widths of configs/demo.py's pretraining, so its export loads as it is:

    python -m insloc_jax.export --workdir runs/demo --format torchvision_detection --arch fpn \
        --output runs/demo/export/step_200.fpn.torchvision_detection.pth
    python -m insloc_jax.finetune --config configs/finetune/demo.py --workdir runs/finetune_demo \
        --config.weights=runs/demo/export/step_200.fpn.torchvision_detection.pth

`--config.arch=c4` (with an export written for `--arch c4`) fine-tunes the R-C4 detector instead.
"""
from configs.finetune import base


def get_config():
    return base.get_config()
