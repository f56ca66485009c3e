"""Every field of a run, with its meaning. Run configs import `get_config()` from here and override a few.

The defaults are InsLoc-FPN 200 epochs on ImageNet (REFERENCE sections 1-4). Values derived from others
(per-device batch, learning rate, steps) are computed in `insloc_jax.config.derive`, never stored here.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # the one seed: init, queues, box augmentation, shuffle BN and the data pipeline

    c.model = ml_collections.ConfigDict()
    c.model.arch = "fpn"  # fpn | c4 | moco
    c.model.depth = 50  # ResNet depth: 18, 34, 50, 101
    c.model.width = 64  # ResNet base width (64 = torchvision)
    c.model.dim = 128  # embedding size
    c.model.fpn_dim = 256  # FPN channels
    c.model.head_convs = 4  # FPN head: 3x3 conv + BN + ReLU layers
    c.model.head_conv_dim = 256  # FPN head conv channels
    c.model.head_fcs = 2  # FPN head fc layers before the projection
    c.model.head_fc_dim = 1024  # FPN head fc width
    c.model.head_out_init_std = 0.01  # init std of the FPN head's 128-d fc (the original's 0.01)
    c.model.mlp_dim = 2048  # hidden width of the c4 / moco projection MLP
    c.model.roi_size = 0  # RoIAlign output side; 0 = 7 for fpn, 14 for c4
    c.model.sampling_ratio = 0  # RoIAlign samples per bin side; 0 = adaptive
    # compute dtype: float32 | bfloat16 (params, BN stats, queues stay float32) | float64 (verification only,
    # with JAX_ENABLE_X64=1)
    c.model.dtype = "float32"

    c.contrast = ml_collections.ConfigDict()
    c.contrast.queue_size = 65536  # K, keys per level; a multiple of the global batch
    c.contrast.temperature = 0.2  # T
    c.contrast.momentum = 0.999  # key encoder momentum m
    # First steps at learning rate 0, so the queue fills with real keys before anything is learned; 0 = the
    # paper's start from a queue of random vectors (which collapses InsLoc-FPN at small scale, BENCHMARKS.md)
    c.contrast.queue_fill_steps = 0
    # Also contrast each query with the other samples' keys of the global batch (not in the paper). With a
    # short queue and a fast key encoder, queued keys are told apart from fresh ones by the encoder's drift
    # alone, so the queue-only loss can be lowered without telling instances apart (BENCHMARKS.md).
    c.contrast.batch_negatives = False

    c.box_aug = ml_collections.ConfigDict()
    c.box_aug.levels = (3,)  # levels whose query box is augmented: (3,) = P5 for fpn, (0,) for c4, () off
    c.box_aug.stride = 16  # anchor centre spacing on the canvas
    c.box_aug.base_size = 16  # anchor side at scale 1, ratio 1
    c.box_aug.scales = (2, 4, 8, 16)  # anchor scales
    c.box_aug.ratios = (0.5, 0.75, 1.0, 1.5, 2.0)  # anchor height / width ratios
    c.box_aug.iou_threshold = 0.5  # candidates: anchors with IoU above this with the true box
    c.box_aug.nms_threshold = 0.7  # NMS among the randomly scored candidates
    c.box_aug.fallback_top_k = 4000  # candidates when no anchor passes iou_threshold

    c.data = ml_collections.ConfigDict()
    c.data.source = ml_collections.ConfigDict()
    # Every field of every kind is here, so any config can be pointed at any source by flags
    # (--config.data.source.kind=folder --config.data.source.root=DIR); each kind reads only its own fields
    # (insloc_jax.data.sources.SPEC_FIELDS).
    c.data.source.kind = "tfds"  # tfds | folder | file_list | synthetic
    c.data.source.name = "imagenet2012"  # tfds: dataset name
    c.data.source.split = "train"  # tfds / synthetic: split
    c.data.source.data_dir = ""  # tfds / synthetic: data directory ("" = tfds default ~/tensorflow_datasets)
    c.data.source.image_key = "image"  # tfds: the feature holding the image
    c.data.source.in_memory = False  # tfds: hold the encoded split in memory (only for sets well under 2 GB)
    c.data.source.root = ""  # folder / file_list: image root
    c.data.source.list_file = ""  # file_list: "relative/path [label]" per line
    c.data.source.image_size = 112  # synthetic: image side
    c.data.source.num_train = 4096  # synthetic: images in the train split
    c.data.source.num_test = 512  # synthetic: images in the held-out test split
    c.data.source.num_classes = 10  # synthetic: classes (labels for the probes)
    c.data.source.seed = 0  # synthetic: generation seed (the dataset, not the run)
    c.data.mode = "insloc"  # insloc (copy-paste composites) | moco (two RandomResizedCrop views)
    c.data.canvas_size = 256  # InsLoc composite side
    c.data.fg_size_range = (128, 255)  # pasted foreground target size, integers in [low, high)
    c.data.moco_size = 224  # MoCo view side
    # dataset: each view's background is a random image of the whole dataset, as in the original (three
    # decodes per sample) | stream: another image of the same stream group (one decode; 2.7x the host rate)
    c.data.background_mode = "dataset"
    c.data.stream_group = 16  # stream mode: consecutive samples that lend each other their backgrounds
    c.data.augment_on = "device"  # device (inside the jitted step) | host (in the input workers)
    c.data.num_workers = -1  # input worker processes: -1 = one per core, 0 = threads in the training process

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 0.03  # learning rate at base_batch; scaled linearly with the global batch
    c.optim.base_batch = 256  # batch of base_lr
    c.optim.momentum = 0.9  # SGD momentum
    c.optim.nesterov = True  # Nesterov (InsLoc) or plain (MoCo-v2)
    c.optim.weight_decay = 1e-4  # on every parameter
    c.optim.epochs = 200  # schedule length
    c.optim.per_epoch = True  # cosine updated per epoch (as the original) instead of per step
    c.optim.schedule = "cosine"  # cosine (the paper) | constant (base lr throughout; for diagnosis)
    c.optim.warmup_steps = 0  # linear warm-up steps (0 = none, as the paper)

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # frozen-feature probes during training every this many steps; 0 = off
    c.eval.seed = 0  # probe composition / augmentation / box-jitter seed
    c.eval.num_test = 512  # held-out images probed (0 = the whole split)
    c.eval.num_bank = 4096  # kNN memory-bank images from eval.train_split (0 = the whole split)
    c.eval.train_split = "train"  # kNN memory bank split
    c.eval.test_split = "test"  # held-out split ("validation" for imagenet2012)
    c.eval.augment = False  # training pixel augmentation on the probe composites (off: see probe_data.Settings)
    c.eval.batch_size = 64  # images per forward pass
    c.eval.fit_fraction = 0.5  # share of held-out instances the box-regression probe is fitted on
    c.eval.jitters = 4  # jittered starting boxes per composite in the box-regression probe
    c.eval.report_num_test = 512  # train.report: held-out images of its retrieval and kNN probes
    c.eval.report_num_bank = 1024  # train.report: kNN memory-bank images (also re-estimate BatchNorm)

    c.train = ml_collections.ConfigDict()
    c.train.global_batch = 256  # all devices of all hosts together
    # Images per BatchNorm group, as the original's 32 per GPU: each device's batch is normalised in
    # per-device batch / 32 groups, so any device count keeps the statistics (0 = each device's whole batch)
    c.train.bn_group_size = 32
    c.train.ghost_groups = 1  # with bn_group_size 0: BN groups per device (G groups = G devices' BN)
    c.train.parallel = "pmap"  # pmap | shard_map
    c.train.total_steps = 0  # stop after this many steps; 0 = epochs x steps per epoch
    c.train.log_every = 50  # steps between metric lines / TensorBoard points
    c.train.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
    c.train.keep_checkpoints = 3  # newest checkpoints kept
    c.train.resume_from = ""  # a checkpoint directory to start from when the workdir has none
    # torchvision | mmdet | detectron2: when the run finishes, also write the last step's query encoder to
    # <workdir>/export/step_<N>.<format>.{pth,pkl} (as `python -m insloc_jax.export`); "" = no
    c.train.export_format = ""
    # When the run finishes, print a report: seconds per phase, retrieval and kNN of the final weights next
    # to random initialisation with a verdict (learned / did not learn), the outputs (insloc_jax/report.py)
    c.train.report = False
    # Compiled steps kept on disk, so a resumed run skips XLA's compile (3.5 min for R50-FPN on an H200):
    # "auto" = <workdir>/compilation_cache, "" = off, else a directory (the training command only).
    c.train.compilation_cache = "auto"
    return c
