"""From positions to pairs of views: InsLoc composites (both background modes) or MoCo-v2 crops.

`Chunks(...)(c)` makes chunk c: the samples of G consecutive local positions c * G .. c * G + G - 1 of one
process, as arrays with a leading [G] dim. A chunk is a pure function of its index (every random draw is
keyed by the sample's global position, `seeds`), so Grain workers can make chunks in any order and any
chunk can be rebuilt on its own.

Background modes:
  dataset: each view's background is a uniformly random image of the dataset, decoded for this sample
           (two extra reads and decodes per sample, as the original).
  stream:  a chunk is a group of G = stream_group consecutive positions; each view's background is another
           member of its group, drawn uniformly (never the foreground itself). The group holds images of a
           random permutation, so this is a random image too, and it costs no extra read or decode: every
           decoded image is resized once to the canvas and serves as a background for its neighbours.
"""
import dataclasses

import numpy as np

from insloc_jax.data import augment, compose, order, seeds
from insloc_jax.data.sources import Source

MODES = ("insloc", "moco")
BACKGROUND_MODES = ("stream", "dataset")
CHUNK = 8  # samples per chunk when samples are independent (moco, dataset backgrounds)


@dataclasses.dataclass(frozen=True)
class Chunks:
    """Picklable chunk maker (Grain ships it to its worker processes).

    Attributes:
      source: the image source.
      seed: run seed.
      size: G, samples per chunk (stream_group in the stream background mode).
      per_host_batch, process_index, process_count: map local positions to global ones (order.py).
      mode, canvas_size, fg_size_range, moco_size, background_mode: the view settings (pipeline.py).
      augment_on: "device" adds the augmentation parameters, "host" applies them.
    """
    source: Source
    seed: int
    size: int
    per_host_batch: int
    process_index: int
    process_count: int
    mode: str
    canvas_size: int
    fg_size_range: tuple
    moco_size: int
    background_mode: str
    augment_on: str

    def __call__(self, chunk: int) -> dict:
        """Chunk `chunk`: {"images" uint8 [G, 2, S, S, 3] (float32 for augment_on="host"), "boxes"
        float32 [G, 2, 4], "index" int64 [G], "position" int64 [G] (global), "skipped" int32 [G], plus
        "aug_apply" bool [G, 2, 4], "aug_factors" float32 [G, 2, 4], "aug_order" int32 [G, 2, 4],
        "aug_sigma" float32 [G, 2] for augment_on="device"}."""
        local = np.arange(chunk * self.size, (chunk + 1) * self.size)
        positions = order.global_position(local, self.per_host_batch, self.process_index, self.process_count)
        decoded = [order.decode_with_fallbacks(self.source, order.image_index(
            self.source.num_examples, q, self.seed), int(q), self.seed) for q in positions]
        if self.mode == "moco":
            samples = [self._moco(image, q) for (_, _, image), q in zip(decoded, positions)]
        elif self.background_mode == "stream":
            samples = self._stream_group(decoded, positions)
        else:
            samples = [self._on_dataset_backgrounds(image, q) for (_, _, image), q in zip(decoded, positions)]
        out = {key: np.stack([s[key] for s in samples]) for key in samples[0]}
        out["index"] = np.array([i for _, i, _ in decoded], np.int64)
        out["position"] = positions.astype(np.int64)
        out["skipped"] = np.array([k for k, _, _ in decoded], np.int32) + out.pop("bg_skipped", 0)
        return out

    def _moco(self, image, position):
        views = [compose.moco_view(image, seeds.rng(self.seed, seeds.VIEW, position, v), self.moco_size)
                 for v in range(2)]
        return self._finish([v[0] for v in views], [v[1] for v in views], position)

    def _layers(self, image, position):
        return [compose.foreground(image, seeds.rng(self.seed, seeds.VIEW, position, v), self.canvas_size,
                                   tuple(self.fg_size_range)) for v in range(2)]

    def _stream_group(self, decoded, positions):
        side = (self.canvas_size, self.canvas_size)
        backgrounds = [compose.resize_uint8(image, side) for _, _, image in decoded]
        samples = []
        for member, ((_, _, image), q) in enumerate(zip(decoded, positions)):
            layers = self._layers(image, q)
            # Another member of the group per view: (member + 1 + offset) mod G, offset in [0, G - 1).
            partners = [(member + 1 + seeds.rng(self.seed, seeds.BACKGROUND, q, v).integers(self.size - 1))
                        % self.size for v in range(2)]
            images = [compose.paste(patch, box, backgrounds[p]) for (patch, box), p in zip(layers, partners)]
            samples.append(self._finish(images, [box for _, box in layers], q))
        return samples

    def _on_dataset_backgrounds(self, image, position):
        draws = seeds.rng(self.seed, seeds.BACKGROUND, position).integers(0, self.source.num_examples, 2)
        side = (self.canvas_size, self.canvas_size)
        images, boxes, skipped = [], [], 0
        for v, (patch, box) in enumerate(self._layers(image, position)):
            tries, _, background = order.decode_with_fallbacks(self.source, int(draws[v]), int(position),
                                                               self.seed, purpose=v + 1)
            images.append(compose.paste(patch, box, compose.resize_uint8(background, side)))
            boxes.append(box)
            skipped += tries
        return dict(self._finish(images, boxes, position), bg_skipped=np.int32(skipped))

    def _finish(self, images, boxes, position):
        """One sample: stacks the two views and adds (device) or applies (host) their augmentation."""
        params = [augment.sample_params(seeds.rng(self.seed, seeds.AUGMENT, position, v)) for v in range(2)]
        if self.augment_on == "host":
            done = [augment.augment(img, box, p) for img, box, p in zip(images, boxes, params)]
            return {"images": np.stack([d[0] for d in done]), "boxes": np.stack([d[1] for d in done])}
        out = {"images": np.stack(images), "boxes": np.stack(boxes).astype(np.float32)}
        for key in params[0]:
            out["aug_" + key] = np.stack([p[key] for p in params])
        return out
