"""From a run config (configs/*.py) to the objects of a run; every derived value is computed here.

Derived values: the per-device batch (global batch over all devices), BatchNorm groups per device, the
learning rate (linear scaling), steps per epoch and total steps, the encoder's kwargs and the anchors. The
step's own settings are read by `step.step_config` and the export format by `train`, so this module imports
neither: imports run from the entry points down, through step/state to config, to models/data/ops.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from insloc_jax import optim
from insloc_jax.models.encoder import Encoder
from insloc_jax.ops import boxes as box_ops

# float64 is a verification mode (tests/test_reference_step.py), under JAX_ENABLE_X64=1 only.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what to change."""


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a run config file (configs/*.py; they import `configs.base`, so the repository
    root must be on the path)."""
    spec = importlib.util.spec_from_file_location("run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_flags(argv):
    """absl's flag parsing for the commands, with a bad `--config` flag reported in one line.

    A config file that does not exist, or an override naming no field (`--config.optim.schedulee=...`),
    raises inside ml_collections' flag parser, past absl's own one-line usage error; both end the command
    here with a message saying which file or field. Pass as `app.run(main, flags_parser=parse_flags)`.
    """
    from absl import app, flags

    try:
        argv = app.parse_flags_with_usage(argv)
        given = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if given is not None:
            # Unless a validator (a required flag) read it during parsing, a file that failed to load is
            # handed back as a stand-in that raises on first use: use it here, once, for every command.
            given.keys()
        return argv
    except OSError as error:  # ml_collections' message ends with the file and the OS's reason
        reason = str(error).strip().splitlines()[-1].strip()
        raise SystemExit(f"error: cannot load the --config file: {reason}") from None
    except (AttributeError, KeyError) as error:
        while error.args and isinstance(error.args[0], BaseException):  # an AttributeError wraps a KeyError
            error = error.args[0]
        what = " ".join(str(error.args[0] if error.args else error).split())
        raise SystemExit(f"error: a --config.<field> override names no field of the config: {what}") from None


@dataclasses.dataclass(frozen=True)
class Derived:
    """Values computed from the config and the machine.

    Attributes:
      per_device_batch: samples per device per step.
      global_batch: samples per step over all devices.
      peak_lr: learning rate at step 0 (linearly scaled).
      steps_per_epoch: global_batch-sized steps in one pass over the data.
      total_steps: steps of the run.
      image_size: input side (canvas_size for InsLoc, moco_size for MoCo).
      bn_groups: BatchNorm groups each device's batch is normalised in (bn_groups).
    """

    per_device_batch: int
    global_batch: int
    peak_lr: float
    steps_per_epoch: int
    total_steps: int
    image_size: int
    bn_groups: int = 1


def derive(config: ml_collections.ConfigDict, num_devices: int, num_examples: int) -> Derived:
    """Checks the config against the machine and the data and computes the derived values.

    Args:
      config: a run config.
      num_devices: devices over all processes.
      num_examples: images in the training source.

    Raises:
      ConfigError: with the field to change.
    """
    global_batch = config.train.global_batch
    if global_batch % num_devices:
        raise ConfigError(f"train.global_batch={global_batch} must be divisible by the {num_devices} devices")
    per_device = global_batch // num_devices
    groups = bn_groups(config, per_device)
    if config.contrast.queue_size % global_batch:
        raise ConfigError(f"contrast.queue_size={config.contrast.queue_size} must be a multiple of "
                          f"train.global_batch={global_batch}")
    if config.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
    if config.model.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("model.dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 (it is for verification; "
                          "train in float32 or bfloat16)")
    steps_per_epoch = max(1, num_examples // global_batch)
    total = config.train.total_steps or steps_per_epoch * config.optim.epochs
    size = input_size(config)
    return Derived(
        per_device_batch=per_device,
        global_batch=global_batch,
        peak_lr=optim.scaled_learning_rate(config.optim.base_lr, global_batch, config.optim.base_batch),
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        image_size=size,
        bn_groups=groups,
    )


def input_size(config: ml_collections.ConfigDict) -> int:
    """The input side: canvas_size for InsLoc composites, moco_size for MoCo views."""
    return config.data.moco_size if config.data.mode == "moco" else config.data.canvas_size


def bn_groups(config: ml_collections.ConfigDict, per_device_batch: int) -> int:
    """BatchNorm groups per device: per_device_batch / train.bn_group_size, or train.ghost_groups when
    bn_group_size is 0.

    The original normalises over the 32 images of each of its 8 GPUs; a group size of 32 gives every batch
    norm those statistics on any device count (one GPU with a batch of 256 normalises 8 groups of 32).

    Raises:
      ConfigError: the group size does not divide the per-device batch, or both fields are set.
    """
    size, ghost = config.train.get("bn_group_size", 0), config.train.ghost_groups
    if not size:
        if per_device_batch % ghost:
            raise ConfigError(f"per-device batch {per_device_batch} must be divisible by train.ghost_groups="
                              f"{ghost}")
        return ghost
    if ghost != 1:
        raise ConfigError(f"train.bn_group_size={size} and train.ghost_groups={ghost} both set the BatchNorm "
                          "groups: keep one (set the other to 0 / 1)")
    if size < 0 or per_device_batch % size:
        raise ConfigError(
            f"train.bn_group_size={size} must divide the per-device batch {per_device_batch} "
            f"(train.global_batch / devices): choose a global batch that gives each device a multiple of {size}, "
            "or another train.bn_group_size (0 = normalise each device's whole batch)")
    return per_device_batch // size


def source_spec(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The data source dict for `data.sources.open_source`: the kind and its own non-empty fields.

    Raises:
      ConfigError: an unknown data.source.kind.
    """
    from insloc_jax.data.sources import SPEC_FIELDS

    source = config.data.source
    if source.kind not in SPEC_FIELDS:
        raise ConfigError(f"data.source.kind must be one of {sorted(SPEC_FIELDS)}, got {source.kind!r}")
    fields = {k: source.get(k) for k in SPEC_FIELDS[source.kind]}
    return {"kind": source.kind, **{k: v for k, v in fields.items() if v not in ("", None)}}


def encoder_kwargs(config: ml_collections.ConfigDict, derived: Optional[Derived] = None) -> Dict[str, Any]:
    """Plain kwargs of `models.encoder.Encoder` from `config.model` and the run's BatchNorm groups
    (`derived.bn_groups`; without `derived`, train.ghost_groups: enough for inference, where batch norm uses
    its running statistics)."""
    m = config.model
    return dict(
        arch=m.arch, depth=m.depth, width=m.width, dim=m.dim, fpn_dim=m.fpn_dim, head_convs=m.head_convs,
        head_conv_dim=m.head_conv_dim, head_fcs=m.head_fcs, head_fc_dim=m.head_fc_dim,
        head_out_init_std=m.head_out_init_std, mlp_dim=m.mlp_dim,
        roi_size=m.roi_size or None, sampling_ratio=m.sampling_ratio, roi_max_side=largest_box_side(config),
        dtype=DTYPES[m.dtype],
        bn_num_groups=derived.bn_groups if derived else config.train.ghost_groups,
    )


def largest_box_side(config: ml_collections.ConfigDict) -> float:
    """The largest box side (input pixels) the encoder pools: the canvas, or the largest box-augmentation
    anchor when one is larger (anchors can extend past a small canvas; RoIAlign's adaptive sampling needs a
    static bound that covers them to stay exact)."""
    size = input_size(config)
    if not config.box_aug.levels:
        return float(size)
    grid = anchors(config, size)
    return float(max(size, np.max(grid[:, 2:] - grid[:, :2])))


def make_encoder(config: ml_collections.ConfigDict, derived: Optional[Derived] = None) -> Encoder:
    """The encoder module of the run (query and key share it); pass `derived` wherever it trains."""
    return Encoder(**encoder_kwargs(config, derived))


def anchors(config: ml_collections.ConfigDict, image_size: int) -> np.ndarray:
    """[A, 4] the box-augmentation anchors on the input canvas."""
    b = config.box_aug
    return box_ops.anchor_grid((image_size, image_size), b.stride, b.base_size, tuple(b.scales), tuple(b.ratios))


def make_optimizer(config: ml_collections.ConfigDict, derived: Derived):
    """(optax transformation, schedule) of the run."""
    kind = config.optim.get("schedule", "cosine")
    if kind not in ("cosine", "constant"):
        raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got {kind!r}")
    schedule = optim.cosine_schedule(derived.peak_lr, derived.total_steps, derived.steps_per_epoch,
                                     per_epoch=config.optim.per_epoch,
                                     warmup_steps=config.optim.get("warmup_steps", 0),
                                     hold_steps=config.contrast.get("queue_fill_steps", 0),
                                     constant=kind == "constant")
    tx = optim.sgd(schedule, config.optim.momentum, config.optim.nesterov, config.optim.weight_decay)
    return tx, schedule
