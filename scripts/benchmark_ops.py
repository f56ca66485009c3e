"""RoIAlign forward+backward timing at InsLoc-FPN sizes: ours vs a direct gather implementation (vs torchvision).

    python scripts/benchmark_ops.py [--batch 32] [--channels 256] [--canvas 256] [--iters 10]

Per level P2..P5 of a `canvas` x `canvas` input (strides 4, 8, 16, 32), `batch` images with one box each,
7x7 output, adaptive sampling, aligned. "ours+idx" is the same op given explicit batch indices (the general path). Times are the median of `iters` runs of a jitted function computing
the RoI features and the gradient of their weighted sum with respect to the features. The gather baseline
samples every bilinear tap of every sample point (4 gathers of [R, 7, G, 7, G, C]). Where torch with CUDA
and torchvision are importable, `torchvision.ops.roi_align` (NCHW, autograd) is timed on the same data.
Nothing here needs TensorFlow.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from insloc_jax.ops.roi_align import default_max_grid, roi_align

OUT = (7, 7)


def gather_roi_align(features, boxes, spatial_scale, max_grid):
    """Direct RoIAlign (aligned, adaptive, one box per image): every sample's four bilinear taps gathered."""
    n, height, width, _ = features.shape
    start = boxes * spatial_scale - 0.5  # [R, 4]
    size = start[:, 2:] - start[:, :2]  # [R, 2] (w, h)
    grid = jnp.clip(jnp.ceil(size / jnp.array(OUT[::-1], jnp.float32)), 0, max_grid)  # [R, 2]
    bins = size / jnp.array(OUT[::-1], jnp.float32)
    slot = jnp.arange(max_grid, dtype=jnp.float32)

    def coords(axis, out):
        cell = jnp.arange(out, dtype=jnp.float32)
        g = jnp.maximum(grid[:, axis], 1.0)[:, None, None]
        b = bins[:, axis][:, None, None]
        pos = start[:, axis][:, None, None] + cell[None, :, None] * b + (slot + 0.5) * b / g  # [R, out, G]
        return pos, slot[None, None, :] < grid[:, axis][:, None, None]

    x, x_used = coords(0, OUT[1])
    y, y_used = coords(1, OUT[0])
    y = y[:, :, :, None, None]  # [R, oh, G, 1, 1]
    x = x[:, None, None, :, :]  # [R, 1, 1, ow, G]
    valid = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    valid &= y_used[:, :, :, None, None] & x_used[:, None, None, :, :]
    y, x = jnp.maximum(y, 0.0), jnp.maximum(x, 0.0)
    y0 = jnp.minimum(jnp.floor(y), height - 1)
    x0 = jnp.minimum(jnp.floor(x), width - 1)
    y1, x1 = jnp.minimum(y0 + 1, height - 1), jnp.minimum(x0 + 1, width - 1)
    ly, lx = jnp.where(y0 >= height - 1, 0.0, y - y0), jnp.where(x0 >= width - 1, 0.0, x - x0)
    image = jnp.arange(n)[:, None, None, None, None]
    total = 0.0
    for yy, xx, w in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x1, (1 - ly) * lx), (y1, x0, ly * (1 - lx)),
                      (y1, x1, ly * lx)):
        taps = features[image, yy.astype(jnp.int32), xx.astype(jnp.int32)]  # [R, oh, G, ow, G, C]
        total = total + taps * (w * valid)[..., None]
    count = jnp.maximum(grid[:, 0] * grid[:, 1], 1.0)[:, None, None, None]
    return total.sum(axis=(2, 4)) / count


def _time(fn, *args, iters):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _fwd_bwd(op):
    def loss(features, boxes, cotangent):
        return jnp.sum(op(features, boxes) * cotangent)

    return jax.jit(jax.value_and_grad(loss))


def _torchvision_ms(features, boxes, scale, iters):
    """torchvision.ops.roi_align forward+backward in ms, or None without CUDA torch + torchvision."""
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    f = torch.tensor(np.asarray(features)).permute(0, 3, 1, 2).contiguous().cuda().requires_grad_(True)
    rois = torch.cat([torch.arange(len(boxes))[:, None].float(), torch.tensor(np.asarray(boxes))], 1).cuda()
    times = []
    for i in range(iters + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = torchvision.ops.roi_align(f, rois, OUT, scale, sampling_ratio=0, aligned=True)
        out.sum().backward()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
        f.grad = None
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, args.canvas / 2, size=(args.batch, 2))
    wh = rng.uniform(args.canvas / 4, args.canvas / 2, size=(args.batch, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + wh], 1), jnp.float32)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}, "
          f"{args.channels} channels, canvas {args.canvas}, 7x7 adaptive aligned, forward+backward")
    print(f"{'level':6} {'map':>9} {'ours ms':>9} {'ours+idx ms':>12} {'gather ms':>10} {'gather/ours':>12} "
          f"{'torchvision ms':>15}")
    indices = jnp.arange(args.batch, dtype=jnp.int32)
    totals = [0.0, 0.0, 0.0]
    for level, stride in zip(("P2", "P3", "P4", "P5"), (4, 8, 16, 32)):
        size = args.canvas // stride
        features = jnp.asarray(rng.standard_normal((args.batch, size, size, args.channels)), jnp.float32)
        cotangent = jnp.asarray(rng.standard_normal((args.batch,) + OUT + (args.channels,)), jnp.float32)
        bound = default_max_grid((size, size), OUT)
        ours = _fwd_bwd(lambda f, b: roi_align(f, b, None, OUT, 1.0 / stride))
        with_indices = _fwd_bwd(lambda f, b: roi_align(f, b, indices, OUT, 1.0 / stride))
        gather = _fwd_bwd(lambda f, b: gather_roi_align(f, b, 1.0 / stride, bound))
        diff = float(jnp.max(jnp.abs(ours(features, boxes, cotangent)[1] - gather(features, boxes, cotangent)[1])))
        assert diff < 1e-3, f"implementations disagree at {level}: {diff}"
        ms = [_time(fn, features, boxes, cotangent, iters=args.iters) for fn in (ours, with_indices, gather)]
        totals = [t + m for t, m in zip(totals, ms)]
        tv = _torchvision_ms(features, boxes, 1.0 / stride, args.iters)
        tv_text = "n/a" if tv is None else f"{tv:.3f}"
        print(f"{level:6} {size:>4}x{size:<4} {ms[0]:9.3f} {ms[1]:12.3f} {ms[2]:10.3f} {ms[2] / ms[0]:12.2f} "
              f"{tv_text:>15}")
    print(f"{'total':16} {totals[0]:9.3f} {totals[1]:12.3f} {totals[2]:10.3f} {totals[2] / totals[0]:12.2f}")


if __name__ == "__main__":
    main()
