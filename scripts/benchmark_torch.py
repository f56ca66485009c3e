"""The InsLoc train step in PyTorch, for benchmarking only: the baseline `scripts/benchmark.py` is compared to.

    python scripts/benchmark_torch.py [--arch fpn|c4] [--per_device_batch 32,64,128] [--dtype bfloat16]
        [--mode eager,compile] [--steps 20]
    python scripts/benchmark_torch.py --device cpu --tiny      # smoke run without torchvision
    (--depth --width --image --fpn_dim --head_dim --fc_dim --mlp_dim --embed_dim --queue override a preset)

One step on one device, as in REFERENCE sections 2-4: ResNet-50 (torchvision's structure), FPN with BatchNorm
(lateral 1x1 + BN, nearest top-down, output 3x3 + BN), `torchvision.ops.roi_align` (7x7, adaptive sampling,
aligned) on each of P2..P5, the shared 4conv-2fc head, L2-normalised 128-d embeddings per level; the C4
variant pools 14x14 from res4 and runs res5 + global pool + MLP 2048-2048-128. The key encoder is a momentum
copy (m = 0.999, parameters only); the P5 query box is box-augmented (anchor IoU > 0.5, random scores,
`batched_nms` at 0.7, one random survivor); InfoNCE per level against a 65536-key queue (T 0.2), losses
summed; SGD with Nesterov momentum 0.9 and weight decay 1e-4, lr 0.03 x batch / 256; the batch's keys are
enqueued FIFO.

Shuffle BN on one device: the key batch is permuted before the key pass and its embeddings are
un-permuted after it, as MoCo does across GPUs. With a single BN group the statistics do not change, so
this only carries the cost of the two gathers (the JAX step on one device does the same).

Precision: bfloat16 runs the encoders under `torch.autocast` (loss and queue in float32); float32 enables
TF32 matmuls and convolutions, which is what XLA uses for float32 on NVIDIA GPUs. On GPUs inputs and
models are channels_last (on the CPU it slows BatchNorm down, so the CPU run keeps NCHW). "compile" wraps
the query and key encoders in `torch.compile` (default mode); box augmentation, loss and optimiser stay
eager. The input is already augmented and normalised (a PyTorch pipeline augments in its data loader), so
the like-for-like JAX figure is the one with `--config.data.augment_on=host`.

The model and the step are `insloc_torch`'s, the PyTorch InsLoc the differential tests check the JAX step
against (`tests/test_reference_step.py`); this script adds only speed: torchvision's RoIAlign and batched NMS
kernels, channels_last, autocast and torch.compile. Without torchvision (the CPU smoke run `--tiny`) the
reference's own RoIAlign and greedy NMS, written from their definitions, run instead: exact, but slow, so
timings from that path say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from insloc_torch import models  # noqa: E402
from insloc_torch.boxes import anchor_grid, greedy_nms  # noqa: E402
from insloc_torch.roi_align import roi_align as reference_roi_align, torchvision_roi_align  # noqa: E402
from insloc_torch.step import TrainStep  # noqa: E402

try:
    import torchvision
    from torchvision.ops import batched_nms
except ImportError:
    torchvision, batched_nms = None, None


def build_encoder(args, device):
    """The query encoder of `args.arch` at the preset's sizes, REFERENCE-initialised, on `device`."""
    roi_align = torchvision_roi_align if torchvision is not None else reference_roi_align
    if args.arch == "fpn":
        encoder = models.FPNEncoder(args.depth, args.width, args.fpn_dim, args.head_dim, args.fc_dim,
                                    args.embed_dim, roi_align=roi_align)
    else:
        encoder = models.C4Encoder(args.depth, args.width, args.mlp_dim, args.embed_dim, roi_align=roi_align)
    return models.init_weights(encoder).to(device, memory_format=memory_format(device))


def make_step(args, batch: int, device):
    """One device's InsLoc step with the paper's settings (random unit-norm queues, lr 0.03 x batch / 256):
    a callable(images_q, boxes_q, images_k, boxes_k) -> detached loss that draws its own box augmentation
    and shuffle."""
    encoder = build_encoder(args, device)
    queues = F.normalize(torch.randn(encoder.levels, args.queue, args.embed_dim, device=device), dim=-1)
    step = TrainStep(encoder, queues, 1, 0.999, 0.2, (encoder.levels - 1,),  # P5 for fpn, the box for c4
                     autocast=torch.bfloat16 if args.dtype == "bfloat16" else None, compiled=args.compiled,
                     keep_grads=False)
    anchors, lr = anchor_grid(args.image).to(device), 0.03 * batch / 256

    def one_step(images_q, boxes_q, images_k, boxes_k):
        scores, draws = (torch.rand(batch, anchors.shape[0], device=device) for _ in range(2))
        q_boxes = step.query_boxes(boxes_q, anchors, scores, draws, nms=batched_nms or greedy_nms)
        permutation = torch.randperm(batch, device=device)
        return step.step(images_q, q_boxes, images_k, boxes_k, permutation, lr)["loss"]

    return one_step


def memory_format(device):
    """channels_last on GPUs (tensor-core convolutions), NCHW on the CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def synthetic_batch(batch: int, image: int, fg_range, device):
    """(images_q, boxes_q, images_k, boxes_k): N(0, 1) images, boxes with sides in fg_range."""
    out = []
    for _ in range(2):
        images = torch.randn(batch, 3, image, image, device=device).contiguous(memory_format=memory_format(device))
        sides = torch.randint(fg_range[0], min(fg_range[1], image + 1), (batch, 2), device=device).float()
        corner = torch.rand(batch, 2, device=device) * (image - sides)
        out += [images, torch.cat([corner, corner + sides], dim=1)]
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args, batch: int, device) -> dict:
    """Builds and times one configuration; returns its row."""
    torch.manual_seed(0)
    step = make_step(args, batch, device)
    data = synthetic_batch(batch, args.image, args.fg_range, device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = step(*data)
    sync(device)
    warm = time.perf_counter() - start
    synced = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step(*data)
        sync(device)
        synced.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(*data)
    sync(device)
    back_to_back = (time.perf_counter() - start) / args.steps
    median = statistics.median(synced)
    return dict(warm=warm, step_ms=median * 1e3, b2b_ms=back_to_back * 1e3, rate=batch / median,
                b2b_rate=batch / back_to_back, loss=float(loss))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="fpn", choices=("fpn", "c4"))
    parser.add_argument("--per_device_batch", default="64", help="comma list")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--mode", default="eager,compile", help="comma list of eager | compile")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="configs/tiny.py sizes: R18 width 8, 64x64, FPN 16, head 16/32, dim 16, queue 64")
    sizes = dict(depth=50, width=64, image=256, fpn_dim=256, head_dim=256, fc_dim=1024, mlp_dim=2048,
                 embed_dim=128, queue=65536)
    for name in sizes:
        parser.add_argument(f"--{name}", type=int, default=None, help="overrides the preset's value")
    args = parser.parse_args(argv)
    if args.tiny:
        sizes = dict(depth=18, width=8, image=64, fpn_dim=16, head_dim=16, fc_dim=32, mlp_dim=32, embed_dim=16,
                     queue=64)
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    # Foreground sides as data.fg_size_range: [canvas / 2, canvas) for both presets.
    args.fg_range = (args.image // 2, args.image - 1)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # TF32 for float32, as XLA's default on NVIDIA GPUs
    torch.backends.cudnn.benchmark = True
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, torchvision {getattr(torchvision, '__version__', 'missing')}, {kind}, "
          f"{args.arch} R{args.depth} {args.image}x{args.image}, {args.dtype}, queue {args.queue}")
    rows = []
    for mode in [m for m in args.mode.split(",") if m]:
        args.compiled = mode == "compile"
        for batch in [int(b) for b in args.per_device_batch.split(",") if b]:
            row = run(args, batch, device)
            rows.append((mode, batch, row))
            print(f"--- torch {mode} {args.arch} batch {batch} {args.dtype}: warm-up {row['warm']:.1f} s, "
                  f"step (median) {row['step_ms']:.2f} ms, back-to-back {row['b2b_ms']:.2f} ms, "
                  f"{row['rate']:.1f} samples/s (back-to-back {row['b2b_rate']:.1f}), loss {row['loss']:.4f}",
                  flush=True)
    print("\n| device | torch mode | arch | batch | dtype | step ms | samples/s |")
    print("|---|---|---|---|---|---|---|")
    for mode, batch, row in rows:
        print(f"| {kind} | {mode} | {args.arch} | {batch} | {args.dtype} | {row['step_ms']:.1f} | {row['rate']:.1f} |")


if __name__ == "__main__":
    main()
