"""Stateless seed derivation for the tf.data graph.

Every random choice in the input pipeline is a pure function of a seed derived from
(config seed, process index, purpose, sample position, view). The purpose is folded in first so that two
kinds of decision never share a stream. Nothing reads global random state, so a
sample is reproduced exactly by recomputing its seed, which is what makes resuming at any step cheap.
"""
import tensorflow as tf

# Purposes: one constant per independent random decision.
VIEW = 1        # crop, target size and paste position of a view
BACKGROUND = 2  # which image serves as a view's background
AUGMENT = 3     # pixel augmentation parameters of a view
EPOCH = 4       # the order of an epoch
FALLBACK = 5    # replacement images for undecodable ones


def root(seed: int, process_index: int) -> tf.Tensor:
    """The per-process root seed.

    Args:
      seed: the run's seed (config.seed).
      process_index: this host's process index.

    Returns:
      int32 [2] stateless seed.
    """
    return tf.constant([seed % (2**31), process_index], tf.int32)


def shared(seed: int) -> tf.Tensor:
    """The seed shared by all processes (epoch orders must agree across hosts); int32 [2]."""
    return tf.constant([seed % (2**31), -1], tf.int32)


def derive(seed: tf.Tensor, *data) -> tf.Tensor:
    """Folds integers (python or scalar tensors) into a stateless seed, one after another.

    Args:
      seed: int32 [2] stateless seed.
      *data: integers to fold in, e.g. (purpose, position, view).

    Returns:
      int32 [2] stateless seed.
    """
    for value in data:
        # fold_in wants an int32 scalar; positions beyond 2**31 wrap, which only re-keys, never collides
        # within one run (2**31 samples is > 1500 ImageNet epochs per process).
        value = tf.cast(tf.math.floormod(tf.cast(value, tf.int64), 2**31), tf.int32)
        seed = tf.random.experimental.stateless_fold_in(seed, value)
    return seed
