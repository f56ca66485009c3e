"""The README demo: InsLoc-FPN on the embedded dataset, small enough to finish in minutes on a laptop CPU.

A ResNet-18 at half width with a slim FPN and 4conv-2fc head (64 channels, fc 256, 64-d embeddings) on
96x96 composites of the embedded images, 32 samples per step, 300 steps. Two departures from the paper's
recipe keep a run this short healthy (see BENCHMARKS.md, "Learning at demo scale"):
  * the first 32 steps run at learning rate 0 so that the queue holds real keys before anything is learned
    (from the paper's queue of random vectors, InsLoc-FPN at this scale collapses within ~40 steps);
  * the learning rate stays constant: when it anneals to zero over 300 steps, the key encoder (momentum
    0.99, about 100 steps behind) catches up with the query encoder in the second half and the loss climbs
    back towards chance.
It is a smoke test of the whole method, not a pretraining recipe (for that, see the *_200ep configs): at
this size the FPN head's embeddings collapse to one drifting direction by step ~150 and the loss falls
without instances being told apart (scripts/pretext_shortcut.py; BENCHMARKS.md).
"""
import ml_collections

from configs import base


def get_config():
    c = base.get_config()
    c.model.update(arch="fpn", depth=18, width=32, dim=64, fpn_dim=64, head_conv_dim=64, head_fc_dim=256,
                   mlp_dim=256)
    c.box_aug.scales = (1, 2, 4, 8)  # anchors sized for a 96-pixel canvas
    c.contrast.queue_size = 1024
    c.contrast.momentum = 0.99  # a short run needs a faster-moving key encoder
    c.contrast.queue_fill_steps = 32  # queue_size / global_batch
    c.data.source = ml_collections.ConfigDict(dict(
        kind="synthetic", split="train", data_dir="data", image_size=112, num_train=4096, num_test=512,
        num_classes=10, seed=0))
    c.data.canvas_size = 96
    c.data.fg_size_range = (48, 95)
    c.data.moco_size = 96
    c.optim.base_lr = 0.06
    c.optim.per_epoch = False
    c.optim.schedule = "constant"
    c.train.global_batch = 32
    c.train.total_steps = 300
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    return c
