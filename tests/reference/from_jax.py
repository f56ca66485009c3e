"""What the reference needs from a JAX run: its weights in torch names (through the project's export), a
matching torch encoder, and the random draws of a step (derived from the step's key as the JAX step does)."""
import jax
import numpy as np
import torch

from insloc_jax import export
from insloc_torch import models


def torch_names(tree, stats, arch):
    """A params-shaped tree (parameters, gradients, momentum) with BN statistics -> {torch name: array}:
    the mmdet export for fpn / c4; for moco the torchvision export under `backbone.` and its MLP by hand
    (the exports carry no MoCo projection)."""
    variables = {"params": tree, "batch_stats": stats}
    if arch != "moco":
        return export.to_mmdet(variables, arch)
    out = {"backbone." + k: v for k, v in export.to_torchvision(variables).items()}
    for fc in ("fc1", "fc2"):
        out[f"projection.{fc}.weight"] = np.asarray(tree["projection"][fc]["kernel"]).T
        out[f"projection.{fc}.bias"] = np.asarray(tree["projection"][fc]["bias"])
    return out


def torch_encoder(model_config):
    """The reference encoder of `config.model`."""
    m = model_config
    if m.arch == "fpn":
        return models.FPNEncoder(m.depth, m.width, m.fpn_dim, m.head_conv_dim, m.head_fc_dim, m.dim,
                                 m.head_convs, m.head_fcs)
    if m.arch == "c4":
        return models.C4Encoder(m.depth, m.width, m.mlp_dim, m.dim)
    return models.MoCoEncoder(m.depth, m.width, m.mlp_dim, m.dim)


def load(module, arrays):
    """Loads {torch name: array} with strict=True (the BN counters, which the export writes as 0, kept)."""
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    for name, value in module.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = value
    module.load_state_dict(state, strict=True)


def draws(state_rng, step, global_batch, anchors_count):
    """(shuffle permutation [N], box scores [N, A], box choice draws [N, A]) of JAX step `step`: the step key
    fold_in(rng, step) splits into the box and shuffle keys; sample i's box key is fold_in(box key, i), split
    into its score and choice keys."""
    box_rng, shuffle_rng = jax.random.split(jax.random.fold_in(state_rng, step))
    permutation = np.asarray(jax.random.permutation(shuffle_rng, global_batch))
    keys = [jax.random.split(jax.random.fold_in(box_rng, i)) for i in range(global_batch)]
    scores = np.stack([np.asarray(jax.random.uniform(k[0], (anchors_count,))) for k in keys])
    choices = np.stack([np.asarray(jax.random.uniform(k[1], (anchors_count,))) for k in keys])
    return permutation, scores, choices


def nchw(images):
    """[N, H, W, 3] numpy -> [N, 3, H, W] torch."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))


def reference_run(config, state, devices, dtype=torch.float32):
    """An insloc_torch.step.TrainStep from the query weights and queues of the JAX host TrainState `state`
    (its key encoder is the query's copy, as a fresh run's), with the config's method and SGD settings,
    computing in `dtype`."""
    from insloc_torch.step import TrainStep

    query = torch_encoder(config.model).to(dtype)
    load(query, torch_names(state.params, state.batch_stats, config.model.arch))
    queues = torch.from_numpy(np.array(state.queues)).to(dtype)
    return TrainStep(query, queues, devices, config.contrast.momentum,
                         config.contrast.temperature, config.box_aug.levels, lr_momentum=config.optim.momentum,
                         nesterov=config.optim.nesterov, weight_decay=config.optim.weight_decay)


def reference_step(ref, batch, state_rng, step, anchors, lr):
    """Runs `ref` on a JAX host batch {image1, image2 [N, H, W, 3] float, boxes1, boxes2 [N, 4]} with the
    draws of JAX step `step`; returns TrainStep.step's metrics as python floats and lists."""
    global_batch = batch["image1"].shape[0]
    dtype = next(ref.query.parameters()).dtype
    tensor = lambda x: torch.from_numpy(np.array(x)).to(dtype)
    permutation, scores, choices = draws(state_rng, step, global_batch, len(anchors))
    # Box augmentation picks an anchor with float32 IoUs and scores (the data's precision), in either mode.
    single = lambda x: torch.from_numpy(np.array(x, np.float32))
    boxes_q = ref.query_boxes(single(batch["boxes1"]), single(anchors), single(scores), tensor(choices)).to(dtype)
    out = ref.step(nchw(batch["image1"]).to(dtype), boxes_q, nchw(batch["image2"]).to(dtype),
                   tensor(batch["boxes2"]), torch.from_numpy(np.array(permutation)), lr)
    return {name: value.tolist() for name, value in out.items()}


def jax_run(config, devices, num_examples):
    """(host TrainState at step 0, step function over the first `devices` local devices taking a replicated
    state and a [devices, B, ...] batch, the lr schedule, the anchors [A, 4]) as training builds them."""
    import functools

    from insloc_jax import config as config_lib
    from insloc_jax.state import create_state
    from insloc_jax.step import compile_step, step_config, train_step

    derived = config_lib.derive(config, devices, num_examples)
    encoder = config_lib.make_encoder(config, derived)
    tx, schedule = config_lib.make_optimizer(config, derived)
    state = create_state(encoder, tx, jax.random.PRNGKey(config.seed), derived.image_size,
                         config.contrast.queue_size)
    anchors = config_lib.anchors(config, derived.image_size)
    per_device = functools.partial(train_step, encoder=encoder, tx=tx, schedule=schedule, anchors=anchors,
                                   config=step_config(config))
    step_fn = compile_step(per_device, "pmap", jax.local_devices()[:devices])
    return jax.device_get(state), step_fn, schedule, np.asarray(anchors)


def method_config(arch, global_batch):
    """configs/tiny.py as `arch`'s method (fpn: InsLoc-FPN, box augmentation on P5; c4: InsLoc-C4 on its one
    level; moco: MoCo-v2, whole-image views, plain momentum), BN per device, `global_batch` per step."""
    from configs import methods, tiny

    c = methods.apply(tiny.get_config(), methods.BY_ARCH[arch])
    c.train.global_batch = global_batch
    c.train.bn_group_size = 0
    return c
