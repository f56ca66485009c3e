"""From decoded samples to pairs of views: InsLoc composites (both background modes) or MoCo-v2 crops.

All functions are tf.data map functions on the dicts made by `order.samples`; their randomness is keyed
by the sample's position, so any sample can be rebuilt on its own.

Background modes:
  dataset: each view's background is a uniformly random image of the dataset, decoded for this sample
           (two extra reads and decodes per sample, as the original).
  stream:  samples are taken in groups of `group` consecutive positions; each view's background is another
           member of its group, drawn uniformly (never the foreground itself). The group was shuffled into
           the stream, so this is a random image too, and it costs no extra read or decode: every decoded
           image is resized once to the canvas and serves as a background for its neighbours.
"""
import tensorflow as tf

from insloc_jax.data import augment, compose, seeds


def foreground_layers(sample, root, canvas_size, fg_size_range):
    """Adds "layers" (uint8 [2, S, S, 3]) and "boxes" (float32 [2, 4]) for the two views."""
    layers, boxes = [], []
    for view in range(2):
        seed = seeds.derive(root, seeds.VIEW, sample["position"], view)
        layer, box = compose.foreground_layer(sample["image"], seed, canvas_size, fg_size_range)
        layers.append(layer)
        boxes.append(box)
    return dict(sample, layers=tf.stack(layers), boxes=tf.stack(boxes))


def stream_background(sample, root, canvas_size, group):
    """Prepares a sample for its stream group.

    Replaces the decoded image by its canvas-sized version (the background it offers to its group) and
    draws, per view, which other member lends the background: "partner_offset" int32 [2] in [0, group - 1),
    the partner being (member + 1 + offset) mod group.
    """
    out = {k: v for k, v in sample.items() if k != "image"}
    out["background"] = compose.resize_uint8(sample["image"], [canvas_size, canvas_size])
    offsets = [tf.random.stateless_uniform([], seeds.derive(root, seeds.BACKGROUND, sample["position"], view),
                                           0, group - 1, dtype=tf.int32) for view in range(2)]
    out["partner_offset"] = tf.stack(offsets)
    return out


def compose_group(group):
    """Composites a group of G samples, each view pasted on another member's background.

    Args:
      group: batched samples with "layers" [G, 2, S, S, 3], "boxes" [G, 2, 4], "background" [G, S, S, 3],
        "partner_offset" [G, 2].

    Returns:
      The group with "images" uint8 [G, 2, S, S, 3] instead of layers, backgrounds and offsets.
    """
    size = tf.shape(group["partner_offset"])[0]
    members = tf.range(size)[:, None]  # [G, 1]
    partners = (members + 1 + group["partner_offset"]) % size  # [G, 2], never the member itself
    backgrounds = tf.gather(group["background"], partners)  # [G, 2, S, S, 3]
    out = {k: v for k, v in group.items() if k not in ("layers", "background", "partner_offset")}
    out["images"] = compose.paste(group["layers"], group["boxes"], backgrounds)
    return out


def compose_from_dataset(sample, canvas_size):
    """Composites both views on their own dataset backgrounds ("backgrounds": two decoded images)."""
    backgrounds = tf.stack([compose.resize_uint8(b, [canvas_size, canvas_size])
                            for b in sample["backgrounds"]])  # [2, S, S, 3]
    images = compose.paste(sample["layers"], sample["boxes"], backgrounds)
    out = {k: v for k, v in sample.items() if k not in ("layers", "backgrounds", "image")}
    out["images"] = images
    return out


def moco_views(sample, root, size):
    """Two MoCo-v2 RandomResizedCrop views: "images" uint8 [2, size, size, 3], "boxes" [2, 4]."""
    images, boxes = [], []
    for view in range(2):
        seed = seeds.derive(root, seeds.VIEW, sample["position"], view)
        image, box = compose.moco_view(sample["image"], seed, size)
        images.append(image)
        boxes.append(box)
    out = {k: v for k, v in sample.items() if k != "image"}
    out.update(images=tf.stack(images), boxes=tf.stack(boxes))
    return out


def augment_params(sample, root):
    """Adds the two views' augmentation parameters, stacked: "aug_apply" bool [2, 4], "aug_factors"
    float32 [2, 4], "aug_order" int32 [2, 4], "aug_sigma" float32 [2]."""
    params = [augment.sample_params(seeds.derive(root, seeds.AUGMENT, sample["position"], view))
              for view in range(2)]
    out = dict(sample)
    for key in params[0]:
        out["aug_" + key] = tf.stack([p[key] for p in params])
    return out


def augment_on_host(sample):
    """Applies the sampled augmentation: "images" become float32 normalised, boxes follow the flip."""
    images, boxes = [], []
    for view in range(2):
        params = {key: sample["aug_" + key][view] for key in ("apply", "factors", "order", "sigma")}
        image, box = augment.augment(sample["images"][view], sample["boxes"][view], params)
        images.append(image)
        boxes.append(box)
    out = {k: v for k, v in sample.items() if not k.startswith("aug_")}
    out.update(images=tf.stack(images), boxes=tf.stack(boxes))
    return out
