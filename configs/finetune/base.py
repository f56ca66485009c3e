"""Every field of a fine-tuning run (`python -m insloc_jax.finetune`), with its meaning.

The defaults are the miniature of the paper's transfer (REFERENCE section 7): Mask R-CNN with a ResNet,
an FPN with BatchNorm and the 4conv-1fc box head with its extra BatchNorm, BatchNorm trained everywhere,
on the embedded detection set (`insloc_jax/data/scenes.py`) at 128 pixels. Run configs import
`get_config()` from here and override a few fields; every field is settable by flag.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # data order, flips, RPN / RoI sampling and the initialisation of new layers
    c.weights = ""  # an export (`python -m insloc_jax.export --format torchvision_detection`); "" = random init
    c.transfer = "all"  # what of the export is loaded: all (backbone + FPN + box head / res5) | backbone
    c.arch = "fpn"  # detector: fpn (Mask R-CNN R-FPN) | c4 (Mask R-CNN R-C4, res5 as the RoI head)
    c.device = "auto"  # torch device: auto (the first CUDA GPU if torch sees one, else the CPU) | cpu | cuda:N

    c.model = ml_collections.ConfigDict()
    c.model.depth = 18  # ResNet depth: 18, 34, 50, 101 (must match the export)
    c.model.width = 32  # ResNet base width (64 = torchvision; must match the export)
    c.model.fpn_dim = 64  # FPN channels (fpn)
    c.model.head_convs = 4  # box head 3x3 conv + BN + ReLU layers (fpn)
    c.model.head_conv_dim = 64  # box head conv channels (fpn)
    c.model.head_fc_dim = 256  # box head fc width (fpn)
    c.model.extra_norm = True  # BatchNorm after the box head's fc, as the original's fine-tuning head
    c.model.mask_conv_dim = 64  # mask head: 4 x (3x3 conv + BN + ReLU) channels (fpn)
    c.model.min_size = 128  # images are resized so the short side is min_size ...
    c.model.max_size = 128  # ... and the long side at most max_size (COCO: 800 / 1333)
    c.model.anchor_sizes = (8, 16, 32, 64, 128)  # one per level P2..P6 (fpn); all on res4 (c4)
    c.model.aspect_ratios = (0.5, 1.0, 2.0)  # anchor height / width ratios
    c.model.roi_canonical_scale = 56  # box side mapped to P4 (COCO's 224 scaled to 128-px images)
    c.model.rpn_pre_nms_train = 600  # proposals kept per level before NMS, training
    c.model.rpn_post_nms_train = 300  # proposals kept after NMS, training
    c.model.rpn_pre_nms_test = 300
    c.model.rpn_post_nms_test = 150
    c.model.rpn_batch_per_image = 128  # anchors sampled per image for the RPN loss
    c.model.roi_batch_per_image = 64  # RoIs sampled per image for the box / mask losses
    c.model.detections_per_image = 50
    c.model.score_thresh = 0.05  # detections below this score are dropped

    c.data = ml_collections.ConfigDict()
    c.data.kind = "embedded"  # embedded (generated locally) | coco (any COCO-format dataset)
    c.data.data_dir = "data"  # embedded: where the generated set lives
    c.data.image_size = 128  # embedded: image side
    c.data.num_train = 1000  # embedded: train images
    c.data.num_val = 500  # embedded: val images
    c.data.num_classes = 10  # embedded: classes (the pretraining set's shape x texture styles)
    c.data.dataset_seed = 0  # embedded: generation seed (independent of `seed`)
    c.data.train_images = ""  # coco: image directory of the train split
    c.data.train_annotations = ""  # coco: its instances JSON
    c.data.val_images = ""  # coco: image directory of the val split
    c.data.val_annotations = ""  # coco: its instances JSON
    c.data.flip = True  # random horizontal flip in training

    c.schedule = ml_collections.ConfigDict()
    c.schedule.iterations = 2000  # training iterations
    c.schedule.batch = 8  # images per iteration
    c.schedule.lr = 0.02  # peak learning rate (SGD, momentum 0.9)
    c.schedule.weight_decay = 1e-4
    c.schedule.warmup = 100  # iterations of linear warm-up from warmup_factor * lr
    c.schedule.warmup_factor = 0.001
    c.schedule.steps = (1500, 1800)  # iterations where the lr is multiplied by 0.1
    c.schedule.checkpoint_every = 250  # iterations between checkpoints (and at the end)
    c.schedule.keep = 2  # checkpoints kept
    c.schedule.eval_every = 0  # iterations between evaluations on val (0 = only at the end)
    c.schedule.log_every = 20
    c.schedule.threads = 0  # torch CPU threads (0 = torch's default)
    return c
