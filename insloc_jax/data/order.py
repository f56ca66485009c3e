"""Which image each sample position holds, and its decoding with skip-and-count of corrupt files.

Positions count samples over the whole run. A process with index p of P, holding b samples per step, makes
local position q = s * b + k (step s, k < b), which is global position

    Q = s * (b * P) + p * b + k,

so the global batch of a step is positions s * b * P .. (s + 1) * b * P - 1 in device order whatever the
number of processes (P = 1: Q = q). Epoch e = Q // n holds the n images of the source once, in a
permutation keyed by (seed, e) alone; every process computes the same permutation, so processes see disjoint
images. Starting at any position costs nothing.

An undecodable image is replaced by the first decodable of stateless random fallbacks keyed by (Q, try), so
positions never shift and a resumed run stays aligned; the replacements are counted in the sample's
`skipped` field. A source in which MAX_TRIES images in a row fail to decode is not a dataset with a few bad
files, and raises DataError.
"""
import functools
import logging

import numpy as np

from insloc_jax.data import seeds
from insloc_jax.data.sources import DecodeError, Source, decode

MAX_TRIES = 64


class DataError(RuntimeError):
    """The source cannot feed the run (e.g. nearly every image is undecodable)."""


def global_position(local, per_host_batch: int, process_index: int, process_count: int):
    """Global position(s) Q of local position(s) q of this process (see the module docstring)."""
    step, k = np.divmod(local, per_host_batch)
    return step * per_host_batch * process_count + process_index * per_host_batch + k


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    # Cached: consecutive positions share an epoch (for ImageNet one permutation is 10 MB and ~20 ms).
    return seeds.rng(seed, seeds.EPOCH, epoch).permutation(n)


def image_index(n: int, position: int, seed: int) -> int:
    """Dataset index held by global position `position` of a source of n images."""
    epoch, offset = divmod(int(position), n)
    return int(_permutation(seed, epoch, n)[offset])


def decode_with_fallbacks(source: Source, index: int, position: int, seed: int, purpose: int = 0):
    """Decodes image `index`, or the first decodable stateless replacement.

    Args:
      source: the image source.
      index: preferred dataset index.
      position: global position of the sample (keys the replacements).
      seed: run seed.
      purpose: 0 for the foreground, b + 1 for the b-th dataset background (independent replacements).

    Returns:
      (skipped int: failures before the image, index int, image uint8 [H, W, 3]).

    Raises:
      DataError: MAX_TRIES images in a row were undecodable.
    """
    draws = None
    for tries in range(MAX_TRIES):
        try:
            return tries, index, decode(source.read(index))
        except (DecodeError, OSError) as err:  # OSError: a listed file that cannot be read
            logging.warning("%s: image %d is undecodable (%s); using a replacement", source.name, index, err)
        if draws is None:
            draws = seeds.rng(seed, seeds.FALLBACK, purpose, position).integers(0, source.num_examples,
                                                                                 MAX_TRIES)
        index = int(draws[tries])
    raise DataError(f"{source.name}: {MAX_TRIES} images in a row were undecodable (last tried: index "
                    f"{index}); check that the source holds JPEG/PNG/BMP/GIF images")
