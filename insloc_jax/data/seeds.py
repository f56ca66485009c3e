"""Stateless random generators for the input pipeline.

Every random choice in the input pipeline is drawn from a generator that is a pure function of
(config seed, purpose, global sample position, view). The purpose comes first so that two kinds of decision
never share a stream. Nothing reads global random state and nothing depends on which process or worker makes
the sample, so a sample is reproduced exactly by recomputing its generator: that is what makes resuming at any
step cheap and the global batch independent of the number of hosts.
"""
import numpy as np

# Purposes: one constant per independent random decision.
VIEW = 1        # crop, target size and paste position of a view
BACKGROUND = 2  # which image serves as a view's background
AUGMENT = 3     # pixel augmentation parameters of a view
EPOCH = 4       # the order of an epoch
FALLBACK = 5    # replacement images for undecodable ones


def rng(seed: int, purpose: int, *data: int) -> np.random.Generator:
    """A generator keyed by (seed, purpose, *data), e.g. rng(seed, VIEW, position, view).

    Args:
      seed: the run's seed (config.seed); any python int (taken modulo 2**63).
      purpose: one of the purpose constants above.
      *data: non-negative integers (positions, views, epochs, tries).

    Returns:
      A fresh np.random.Generator (PCG64 seeded through SeedSequence, which mixes every word).
    """
    return np.random.default_rng([int(seed) % 2**63, purpose, *(int(d) for d in data)])
