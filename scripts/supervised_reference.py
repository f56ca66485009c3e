"""Trains a run config's backbone on the dataset's labels: the ceiling the kNN probe can be read against.

    python scripts/supervised_reference.py --config configs/demo.py --steps 900 --eval_every 300 [--lr 0.05]

The backbone of `config_lib.make_encoder(config)` (from its step-0 initialisation) with a linear classifier
on global-pooled res5, trained with softmax cross-entropy on whole training images (the kNN probe's memory
bank: eval.train_split, eval.num_bank, resized to data.moco_size, random horizontal flips), SGD with
momentum 0.9, weight decay 1e-4 and a constant learning rate, config.train.global_batch images per step, one
device. Every `eval_every` steps it prints the classifier's top-1 on the held-out images (eval.test_split,
eval.num_test) and the kNN probe (`probes.knn_top1`, as `insloc_jax.evaluate` runs it) on the same res5
features, so a self-supervised run's kNN can be compared with what labels reach in the same steps.
"""
import argparse
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax.eval import data as probe_data, probes  # noqa: E402

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
EVAL_BATCH = 256  # images per evaluation forward pass


def make_functions(config, num_classes: int, lr: float):
    """(init(), step(state, images, labels) -> (state, loss), features_and_logits(state, images)), jitted.

    images are float32 [B, s, s, 3] normalised, labels int [B]; features are [B, C5] pooled res5 and
    logits [B, num_classes]. The state is (params, batch_stats, optimiser state).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from insloc_jax.eval.run import random_variables
    from insloc_jax.models.encoder import Encoder

    encoder = config_lib.make_encoder(config)
    classifier = nn.Dense(num_classes)
    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(lr, momentum=MOMENTUM))

    def init():
        variables = random_variables(config)
        dim = jax.eval_shape(lambda: pooled(variables["params"], variables["batch_stats"],
                                            jnp.zeros((1, config.data.moco_size, config.data.moco_size, 3)),
                                            False)[0]).shape[-1]
        params = {"encoder": variables["params"],
                  "classifier": classifier.init(jax.random.PRNGKey(1), jnp.zeros((1, dim)))["params"]}
        return params, variables["batch_stats"], tx.init(params)

    def pooled(encoder_params, batch_stats, images, train):
        """Global-pooled res5 [B, C5] and the (updated when training) BatchNorm statistics."""
        variables = {"params": encoder_params, "batch_stats": batch_stats}
        if train:
            feats, updates = encoder.apply(variables, images, train=True, method=Encoder.features,
                                           mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            feats = encoder.apply(variables, images, train=False, method=Encoder.features)
        return feats["res5"].astype(jnp.float32).mean(axis=(1, 2)), batch_stats

    def loss_fn(params, batch_stats, images, labels):
        feats, batch_stats = pooled(params["encoder"], batch_stats, images, True)
        logits = classifier.apply({"params": params["classifier"]}, feats)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), batch_stats

    @jax.jit
    def step(state, images, labels):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images,
                                                                               labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    @jax.jit
    def features_and_logits(state, images):
        params, batch_stats, _ = state
        feats, _ = pooled(params["encoder"], batch_stats, images, False)
        return feats, classifier.apply({"params": params["classifier"]}, feats)

    return init, step, features_and_logits


def train_supervised(config, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                     test_labels: np.ndarray, steps: int, eval_every: int, lr: float,
                     seed: int = 0) -> List[Dict[str, float]]:
    """Trains and evaluates; returns one row {"step", "loss", "test_top1", "knn_top1"} per evaluation.

    Args:
      config: run config (model, train.global_batch, data.moco_size).
      train_images / test_images: float32 [N, s, s, 3] normalised whole images.
      train_labels / test_labels: int [N] labels in [0, C), C = 1 + the largest label.
      steps, eval_every: optimisation steps, and steps between evaluations.
      lr: constant learning rate.
      seed: batch sampling and flip seed.
    """
    from insloc_jax.eval.features import batched

    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    init, step, features_and_logits = make_functions(config, num_classes, lr)
    state = init()
    rng = np.random.default_rng(seed)
    batch = config.train.global_batch
    rows = []
    for i in range(1, steps + 1):
        index = rng.integers(0, len(train_images), batch)
        flip = rng.random(batch) < 0.5
        images = np.where(flip[:, None, None, None], train_images[index, :, ::-1], train_images[index])
        state, loss = step(state, images, train_labels[index])
        if i % eval_every == 0 or i == steps:
            bank, _ = batched(features_and_logits, state, [train_images], EVAL_BATCH)
            queries, logits = batched(features_and_logits, state, [test_images], EVAL_BATCH)
            rows.append({"step": i, "loss": float(loss),
                         "test_top1": float(np.mean(np.argmax(logits, axis=1) == test_labels)),
                         "knn_top1": probes.knn_top1(bank, train_labels, queries, test_labels, num_classes)})
            print(f"| {i} | {rows[-1]['loss']:.3f} | {rows[-1]['test_top1']:.3f} | {rows[-1]['knn_top1']:.3f} |",
                  flush=True)
    return rows


def main(argv=None) -> List[Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.py", help="run config file")
    parser.add_argument("--steps", type=int, default=900, help="optimisation steps")
    parser.add_argument("--eval_every", type=int, default=300, help="steps between evaluations")
    parser.add_argument("--lr", type=float, default=0.05, help="constant SGD learning rate")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config):
        parser.error(f"config file {args.config} does not exist; pass --config (e.g. configs/demo.py)")
    config = config_lib.load_config_file(args.config)
    settings = probe_data.Settings.from_config(config)
    spec = config_lib.source_spec(config)
    splits = []
    for split, limit in ((settings.train_split, settings.num_bank), (settings.test_split, settings.num_test)):
        images, labels = probe_data.read_split(dict(spec, split=split), limit)
        if np.any(labels < 0):
            raise SystemExit(f"error: the {split} split has no labels; a supervised reference needs them")
        splits += [probe_data.whole_images(images, config.data.moco_size), labels]
    print("| step | train loss | held-out top-1 | kNN top-1 |\n|---|---|---|---|", flush=True)
    return train_supervised(config, *splits, steps=args.steps, eval_every=args.eval_every, lr=args.lr)


if __name__ == "__main__":
    main()
