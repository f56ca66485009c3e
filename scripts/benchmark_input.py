"""Input pipeline throughput: samples/s per CPU core (a sample = two augmented views) and where time goes.

  python scripts/benchmark_input.py [--image_dir /tmp/insloc_bench_jpeg] [--threads 1] [--batches 20]

Writes a folder of ImageNet-sized JPEGs once (embedded-dataset content upscaled to 333..500 px sides,
quality 90), then times 256x256 InsLoc composites read from it in both background modes. The breakdown
runs the pipeline cut after each stage (decode only; + composition, views left uint8 as with
augment_on="device"; + pixel augmentation on the host) and reports each stage's cost per sample. The JAX
augmentation (augment_jax, meant for the accelerator) is timed on this host's CPU for comparison.
"""
import argparse
import os
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from insloc_jax.data import order, pipeline, sources, synthetic


def write_jpegs(image_dir: str, count: int) -> None:
    """ImageNet-like JPEGs (sides 333..500, quality 90) from the embedded dataset's generator."""
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = os.path.join(image_dir, f"{i:05d}.jpg")
        if os.path.exists(path):
            continue
        image, _ = synthetic.generate_image(0, 0, i, 160, 10)
        size = tuple(int(s) for s in rng.integers(333, 501, size=2))
        Image.fromarray(image).resize(size, Image.BICUBIC).save(path, quality=90)


def rate(batches, count: int, batch: int) -> float:
    """Samples per second over `count` batches after two warm-up batches."""
    for _ in range(2):
        next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch / (time.perf_counter() - start)


def decode_rate(spec: dict, background_mode: str, threads: int, count: int, batch: int) -> float:
    """Samples/s of reading and decoding alone (three images per sample in dataset mode)."""
    src = sources.open_source(spec)
    ds = order.samples(src, start=0, seed=0, process_index=0, process_count=1,
                       backgrounds=2 if background_mode == "dataset" else 0)
    ds = ds.map(lambda s: s["position"]).batch(batch).prefetch(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return rate(ds.with_options(options).as_numpy_iterator(), count, batch)


def jax_augment_rate(batch: dict, count: int) -> float:
    """Samples/s of augment_jax on this host's CPU (both views), on a pipeline batch."""
    import jax  # imported here: the rest of the benchmark needs no JAX
    from insloc_jax.data import augment_jax
    step = jax.jit(lambda b: (augment_jax.augment_views(b, 1), augment_jax.augment_views(b, 2)))
    device_batch = jax.device_put(batch)
    jax.block_until_ready(step(device_batch))
    start = time.perf_counter()
    for _ in range(count):
        jax.block_until_ready(step(device_batch))
    return count * batch["index"].size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_dir", default="/tmp/insloc_bench_jpeg")
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="tf.data threads (= cores measured)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    write_jpegs(args.image_dir, args.num_images)
    spec = {"kind": "folder", "root": args.image_dir}
    common = dict(source=spec, per_device_batch=args.batch, local_devices=1, num_threads=args.threads,
                  canvas_size=256)
    print(f"{args.num_images} JPEGs in {args.image_dir}; {args.threads} tf.data thread(s); host has "
          f"{os.cpu_count()} logical cores (shared with other work: figures are a lower bound)")
    print(f"{'background':<12}{'host-aug':>10}{'device-aug':>12}{'decode':>9}{'compose':>9}{'augment':>9}")
    print(f"{'':<12}{'samples/s/core':>22}{'ms of one core per sample':>27}")
    for background_mode in ("stream", "dataset"):
        host = rate(pipeline.make_pipeline(background_mode=background_mode, augment_on="host", **common),
                    args.batches, args.batch)
        device = rate(pipeline.make_pipeline(background_mode=background_mode, augment_on="device", **common),
                      args.batches, args.batch)
        decoded = decode_rate(spec, background_mode, args.threads, args.batches, args.batch)
        host, device, decoded = (r / args.threads for r in (host, device, decoded))  # per core
        print(f"{background_mode:<12}{host:>10.1f}{device:>12.1f}{1000 / decoded:>9.2f}"
              f"{1000 / device - 1000 / decoded:>9.2f}{1000 / host - 1000 / device:>9.2f}")
    batch = next(pipeline.make_pipeline(augment_on="device", **common))
    print(f"augment_jax jitted on this host's CPU (XLA, all cores): {jax_augment_rate(batch, 5):.1f} samples/s")
    print("host-aug: tf.data does everything; device-aug: host part only, pixel augmentation left to the "
          "accelerator (augment_jax inside the jitted step)")


if __name__ == "__main__":
    main()
