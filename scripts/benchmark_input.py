"""Input pipeline throughput: samples/s per worker process (a sample = two views) and where time goes.

  python scripts/benchmark_input.py [--image_dir /tmp/insloc_bench_imagenet_like] [--workers 1 2] [--batches 20]

Writes a folder of ImageNet-sized JPEGs once (embedded-dataset content upscaled to 500 x 333..375 with
photographic grain, quality 90, about 110 kB), then times 256x256 InsLoc composites read from it through
the real pipeline (Grain worker processes) in both background modes, with pixel augmentation left to the device (the default)
and on the host. Each worker is one core's worth of work, so samples/s per worker is samples/s per core
(on a machine with at least that many free cores). The breakdown times the stages of one sample in this
process on one core: decode (three images in dataset mode), composition, augmentation parameters, and the
host-side pixel augmentation. Memory per worker is each worker process's resident set size.
"""
import argparse
import os
import time

import cv2
import numpy as np
from PIL import Image

from insloc_jax.data import augment, compose, order, pipeline, seeds, sources, synthetic

GRAIN = 19.0  # std of the fine grain, in gray levels: sets the files' size (about 110 kB)


def write_jpegs(image_dir: str, count: int) -> None:
    """ImageNet-like JPEGs: 500 x 333..375 (a quarter of them portrait), quality 90, about 110 kB each.

    The embedded dataset's content upscaled is too smooth to weigh what a photograph weighs (29 kB at these
    sides); grain at two scales (per pixel: std GRAIN in luma, GRAIN / 2 per channel; per 2x2 block: GRAIN)
    brings the entropy, and with it the decoding cost, to ImageNet's.
    """
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = os.path.join(image_dir, f"{i:05d}.jpg")
        short = int(rng.integers(333, 376))
        w, h = (500, short) if rng.random() < 0.75 else (short, 500)
        if os.path.exists(path):
            continue
        image, _ = synthetic.generate_image(0, 0, i, 160, 10)
        pixels = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC), np.float32)
        grain = rng.normal(0, GRAIN, (h, w, 1)) + rng.normal(0, GRAIN / 2, (h, w, 3))
        blotches = cv2.resize(rng.normal(0, GRAIN, (h // 2, w // 2, 3)).astype(np.float32), (w, h))
        Image.fromarray(np.clip(pixels + grain + blotches, 0, 255).astype(np.uint8)).save(path, quality=90)


def worker_rss_mb() -> list:
    """Resident set size (MB) of each child process of this one (the Grain workers)."""
    sizes = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != os.getpid():
                    continue
            with open(f"/proc/{pid}/status") as f:
                sizes += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS")]
        except (OSError, IndexError, ValueError):
            continue
    return sizes


def rate(batches, count: int, batch: int):
    """(samples/s over `count` batches after two warm-up batches, worker RSS list in MB)."""
    for _ in range(2):
        next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch / (time.perf_counter() - start), worker_rss_mb()


def stage_ms(src, background_mode: str, count: int) -> dict:
    """Milliseconds of one core per sample for each stage, timed on `count` samples in this process."""
    totals = dict.fromkeys(("decode", "compose", "params", "host augment"), 0.0)
    canvas = (256, 256)
    for q in range(count):
        t0 = time.perf_counter()
        _, _, image = order.decode_with_fallbacks(src, order.image_index(src.num_examples, q, 0), q, 0)
        if background_mode == "dataset":
            backgrounds = [order.decode_with_fallbacks(src, int(i), q, 0, b + 1)[2]
                           for b, i in enumerate(seeds.rng(0, seeds.BACKGROUND, q).integers(0, src.num_examples, 2))]
        t1 = time.perf_counter()
        if background_mode == "stream":
            backgrounds = [compose.resize_uint8(image, canvas)] * 2  # one resize per sample, shared by its group
        else:
            backgrounds = [compose.resize_uint8(b, canvas) for b in backgrounds]
        views = []
        for v in range(2):
            patch, box = compose.foreground(image, seeds.rng(0, seeds.VIEW, q, v), 256, (128, 255))
            views.append((compose.paste(patch, box, backgrounds[v]), box))
        t2 = time.perf_counter()
        params = [augment.sample_params(seeds.rng(0, seeds.AUGMENT, q, v)) for v in range(2)]
        t3 = time.perf_counter()
        for (img, box), p in zip(views, params):
            augment.augment(img, box, p)
        t4 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += dt
    return {k: 1000 * v / count for k, v in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_dir", default="/tmp/insloc_bench_imagenet_like")
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker process counts")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    write_jpegs(args.image_dir, args.num_images)
    spec = {"kind": "folder", "root": args.image_dir}
    src = sources.open_source(spec)
    sizes = [os.path.getsize(os.path.join(args.image_dir, f)) for f in os.listdir(args.image_dir)]
    print(f"{len(sizes)} JPEGs in {args.image_dir} (mean {np.mean(sizes) / 1e3:.0f} kB); host has "
          f"{os.cpu_count()} logical cores (shared with other work: figures are a lower bound)")
    print(f"{'background':<11}{'augment':<8}{'workers':>8}{'samples/s':>11}{'per worker':>12}{'RSS/worker':>12}")
    for background_mode in ("stream", "dataset"):
        for augment_on in ("device", "host"):
            for workers in args.workers:
                batches = pipeline.make_pipeline(source=src, background_mode=background_mode,
                                                 augment_on=augment_on, per_device_batch=args.batch,
                                                 local_devices=1, canvas_size=256, num_workers=workers)
                total, rss = rate(batches, args.batches, args.batch)
                print(f"{background_mode:<11}{augment_on:<8}{workers:>8}{total:>11.1f}{total / workers:>12.1f}"
                      f"{np.mean(rss) if rss else float('nan'):>10.0f}MB", flush=True)
                del batches
    print("ms of one core per sample, by stage (this process):")
    for background_mode in ("stream", "dataset"):
        parts = stage_ms(src, background_mode, 200)
        print(f"  {background_mode:<8}" + "  ".join(f"{k} {v:.2f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
