"""Which image each sample position holds, and its decoding with skip-and-count of corrupt files.

Positions q = 0, 1, 2, ... count this process's samples over the whole run; sample q of step s is
q = s * per_host_batch + k. An epoch holds n = num_examples // process_count positions per process.

Indexable sources: position q of epoch e = q // n maps to global slot (q % n) * process_count +
process_index, and the slot to an image by a stateless permutation of the dataset keyed by (seed, e)
(`tf.random.experimental.index_shuffle`), the same on every host, so hosts see disjoint images. Starting at
any q costs nothing. An undecodable image is replaced by the first decodable of a few stateless random
fallbacks keyed by q, so positions never shift and a resumed run stays aligned; the replacements are counted
in the sample's `skipped` field.

Streamed sources: each process reads its contiguous 1/process_count of the split, shuffled per epoch with
a buffer seeded by (seed, e). Starting at q reads and discards the q % n records before it in its epoch:
no decoding, but up to one epoch of file reading (for ImageNet on one of 8 hosts, at most 1/8 of the
140 GB) plus refilling the shuffle buffer. Undecodable records are dropped; the pipeline counts them from
the gaps in `position`.
"""
import tensorflow as tf

from insloc_jax.data import seeds
from insloc_jax.data.sources import Source, decode


def epoch_length(source: Source, process_count: int) -> int:
    """Positions per epoch on one process."""
    n = source.num_examples // process_count
    if n < 1:
        raise ValueError(f"{source.name} has {source.num_examples} images, fewer than {process_count} hosts")
    return n


def indexed_image(source: Source, position, seed: int, process_index: int, process_count: int):
    """Dataset index (int64 scalar) held by a position of an indexable source."""
    n = epoch_length(source, process_count)
    epoch, offset = position // n, position % n
    slot = offset * process_count + process_index
    order_seed = seeds.derive(seeds.shared(seed), seeds.EPOCH, epoch)
    return tf.random.experimental.index_shuffle(slot, order_seed, tf.constant(source.num_examples - 1,
                                                                              tf.int64))


def first_decodable(source: Source, candidates) -> tf.data.Dataset:
    """One-element dataset: the first candidate index whose image decodes (empty if none does).

    Args:
      source: an indexable source.
      candidates: int64 [K] dataset indices, preferred first.

    Returns:
      tf.data of one (skipped int32, index int64, image uint8 [H, W, 3]), skipped = failures before it.
    """
    tries = tf.data.Dataset.from_tensor_slices((tf.range(tf.shape(candidates)[0]), candidates))
    decoded = tries.map(lambda k, i: (k, i, decode(source.read(i))))
    return decoded.ignore_errors(log_warning=True).take(1)


def candidates(source: Source, index, position, root, purpose: int, fallbacks: int):
    """index followed by `fallbacks` stateless random indices, int64 [1 + fallbacks]."""
    seed = seeds.derive(root, seeds.FALLBACK, purpose, position)
    extra = tf.random.stateless_uniform([fallbacks], seed, 0, source.num_examples, dtype=tf.int64)
    return tf.concat([index[None], extra], axis=0)


def indexable_samples(source: Source, *, start: int, seed: int, process_index: int, process_count: int,
                      backgrounds: int = 0, fallbacks: int = 4) -> tf.data.Dataset:
    """Decoded samples of an indexable source from position `start` on, in position order.

    Args:
      source: indexable source.
      start: first position.
      seed: run seed.
      process_index, process_count: this host and the number of hosts.
      backgrounds: number of extra uniformly random dataset images per sample (dataset background mode).
      fallbacks: replacement tries for an undecodable image.

    Returns:
      tf.data of {"position" int64, "index" int64, "image" uint8 [H, W, 3], "skipped" int32} plus, if
      backgrounds > 0, "backgrounds": a tuple of that many decoded images.
    """
    root = seeds.root(seed, process_index)

    def sample(position):
        index = indexed_image(source, position, seed, process_index, process_count)
        parts = [first_decodable(source, candidates(source, index, position, root, 0, fallbacks))]
        bg_seed = seeds.derive(root, seeds.BACKGROUND, position)
        bg_index = tf.random.stateless_uniform([backgrounds], bg_seed, 0, source.num_examples, tf.int64)
        for b in range(backgrounds):
            parts.append(first_decodable(source, candidates(source, bg_index[b], position, root, b + 1,
                                                            fallbacks)))
        return tf.data.Dataset.zip(tuple(parts)).map(lambda *p: _pack(position, p))

    positions = tf.data.Dataset.range(start, 2**62)
    return positions.interleave(sample, cycle_length=16, block_length=1,
                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _pack(position, parts):
    sample = {"position": position, "index": parts[0][1], "image": parts[0][2],
              "skipped": tf.add_n([p[0] for p in parts])}
    if len(parts) > 1:
        sample["backgrounds"] = tuple(p[2] for p in parts[1:])
    return sample


def streamed_samples(source: Source, *, start: int, seed: int, process_index: int, process_count: int,
                     backgrounds: int = 0, shuffle_buffer: int = 10_000) -> tf.data.Dataset:
    """Decoded samples of a streamed source from position `start` on (same output as indexable_samples)."""
    n = epoch_length(source, process_count)
    first_epoch, offset = divmod(start, n)

    def shuffled(stream_id):
        records = source.records(process_index * n, (process_index + 1) * n)
        def epoch(e):
            order_seed = seeds.derive(seeds.root(seed, process_index), seeds.EPOCH, stream_id, e)
            return records.shuffle(shuffle_buffer, seed=tf.cast(order_seed[0], tf.int64),
                                   reshuffle_each_iteration=False)
        epochs = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(offset)
        return tf.data.Dataset.zip(tf.data.Dataset.range(start, 2**62), epochs)

    def decoded(stream):
        return stream.map(lambda q, r: (q, r["index"], decode(r["bytes"])),
                          num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)

    parts = [decoded(shuffled(s)) for s in range(1 + backgrounds)]
    return tf.data.Dataset.zip(tuple(parts)).map(
        lambda *p: _pack(p[0][0], [(tf.constant(0, tf.int32),) + x[1:] for x in p]))


def samples(source: Source, **kwargs) -> tf.data.Dataset:
    """Dispatches to indexable_samples or streamed_samples (shuffle_buffer/fallbacks go where they apply)."""
    if source.indexable:
        kwargs.pop("shuffle_buffer", None)
        return indexable_samples(source, **kwargs)
    kwargs.pop("fallbacks", None)
    return streamed_samples(source, **kwargs)
