"""The tiny InsLoc-FPN run the tests use: a few-channel ResNet-18 on 64x64 composites of the embedded
dataset, 16 samples per step. Builds and steps in seconds on a CPU; it learns nothing useful. Its samples are
made in the training process (data.num_workers = 0): starting worker processes would cost more than its
few steps take. Its backgrounds come from the stream group (one decode per sample) and BatchNorm normalises
each device's whole batch (train.bn_group_size = 0), so any device count the tests simulate divides it."""
from configs import base


def get_config():
    c = base.get_config()
    c.model.update(depth=18, width=8, dim=16, fpn_dim=16, head_conv_dim=16, head_fc_dim=32, mlp_dim=32)
    c.contrast.queue_size = 64
    c.data.source.update(kind="synthetic", data_dir="/tmp/insloc_jax_data", image_size=48, num_train=64,
                         num_test=16, num_classes=4)
    c.data.canvas_size = 64
    c.data.fg_size_range = (32, 63)
    c.data.moco_size = 48
    c.data.num_workers = 0
    c.data.background_mode = "stream"
    c.data.stream_group = 8  # divides the per-host batch of 2 processes (8), as several hosts require
    c.train.global_batch = 16
    c.train.bn_group_size = 0
    c.train.total_steps = 6
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    return c
