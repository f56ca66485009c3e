"""The miniature fine-tune: Mask R-CNN R18(width 32)-FPN on the embedded detection set (1,000 train and 500
val images of 128 pixels), the sizes of configs/demo.py's pretraining, so its export loads as it is.

    python -m insloc_jax.finetune --config configs/finetune/demo.py --workdir W \
        --config.weights=runs/demo/export/step_200.torchvision_detection.pth --config.arch=c4
"""
from configs.finetune import base


def get_config():
    return base.get_config()
