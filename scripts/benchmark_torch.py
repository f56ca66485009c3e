"""The InsLoc train step in PyTorch, for benchmarking only: the baseline `scripts/benchmark.py` is compared to.

    python scripts/benchmark_torch.py [--arch fpn|c4] [--per_device_batch 32,64,128] [--dtype bfloat16]
        [--mode eager,compile] [--steps 20]
    python scripts/benchmark_torch.py --device cpu --tiny      # smoke run without torchvision
    (--depth --width --image --fpn_dim --head_dim --fc_dim --mlp_dim --embed_dim --queue override a preset)

One step on one device, as in REFERENCE sections 2-4: torchvision ResNet-50, FPN with BatchNorm (lateral
1x1 + BN, nearest top-down, output 3x3 + BN), `torchvision.ops.roi_align` (7x7, adaptive sampling,
aligned) on each of P2..P5, the shared 4conv-2fc head, L2-normalised 128-d embeddings per level; the C4
variant pools 14x14 from res4 and runs res5 + global pool + MLP 2048-2048-128. The key encoder is a
momentum copy (m = 0.999, parameters only); the P5 query box is box-augmented (anchor IoU > 0.5, random
scores, `batched_nms` at 0.7, one random survivor); InfoNCE per level against a 65536-key queue (T 0.2),
losses summed; SGD with Nesterov momentum 0.9 and weight decay 1e-4, lr 0.03 x batch / 256; the batch's
keys are enqueued FIFO.

Shuffle BN on one device: the key batch is permuted before the key pass and its embeddings are
un-permuted after it, as MoCo does across GPUs. With a single BN group the statistics do not change, so
this only carries the cost of the two gathers (the JAX step on one device does the same).

Precision: bfloat16 runs the encoders under `torch.autocast` (loss and queue in float32); float32 enables
TF32 matmuls and convolutions, which is what XLA uses for float32 on NVIDIA GPUs. On GPUs inputs and
models are channels_last (on the CPU it slows BatchNorm down, so the CPU run keeps NCHW). "compile" wraps
the query and key encoders in `torch.compile` (default mode); box augmentation, loss and optimiser stay
eager. The input is already augmented and normalised (a PyTorch pipeline augments in its data loader), so
the like-for-like JAX figure is the one with `--config.data.augment_on=host`.

Without torchvision (the CPU smoke run `--tiny`), a plain-torch ResNet with torchvision's structure, a
`grid_sample` RoIAlign with a fixed 2x2 sampling grid (approximate borders and sampling; not for figures)
and box augmentation without NMS stand in. Timings from that path say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import torchvision
    from torchvision.ops import batched_nms, roi_align as tv_roi_align
except ImportError:
    torchvision = None

FPN_STRIDES = (4, 8, 16, 32)
C4_STRIDE = 16
EXPANSION = {"basic": 1, "bottleneck": 4}
BLOCKS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


class Block(nn.Module):
    """torchvision BasicBlock / Bottleneck (stride on the 3x3), same attribute names."""

    def __init__(self, kind: str, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * EXPANSION[kind]
        if kind == "basic":
            self.convs = [(3, cin, planes, stride), (3, planes, planes, 1)]
        else:
            self.convs = [(1, cin, planes, 1), (3, planes, planes, stride), (1, planes, cout, 1)]
        for i, (k, a, b, s) in enumerate(self.convs):
            setattr(self, f"conv{i + 1}", nn.Conv2d(a, b, k, s, k // 2, bias=False))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(b))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        """[B, Cin, H, W] -> [B, Cout, H / stride, W / stride]."""
        y = x
        for i in range(len(self.convs)):
            y = getattr(self, f"bn{i + 1}")(getattr(self, f"conv{i + 1}")(y))
            if i + 1 < len(self.convs):
                y = F.relu(y)
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class PlainResNet(nn.Module):
    """torchvision's ResNet structure and names for any base width (stand-in where torchvision is missing)."""

    def __init__(self, depth: int, width: int):
        super().__init__()
        kind, counts = BLOCKS[depth]
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, count in enumerate(counts):
            blocks = []
            for j in range(count):
                blocks.append(Block(kind, cin, width * 2**i, (1 if i == 0 else 2) if j == 0 else 1))
                cin = width * 2**i * EXPANSION[kind]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))


def make_resnet(depth: int, width: int) -> nn.Module:
    """torchvision's ResNet where it exists and the width is torchvision's, else the plain stand-in."""
    if torchvision is not None and width == 64:
        return getattr(torchvision.models, f"resnet{depth}")()
    return PlainResNet(depth, width)


def stem_and_stages(net: nn.Module, x: torch.Tensor, stages: int):
    """[B, 3, H, W] -> [res2, ..., res(stages + 1)] feature maps."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    outputs = []
    for i in range(stages):
        x = getattr(net, f"layer{i + 1}")(x)
        outputs.append(x)
    return outputs


def grid_roi_align(features, rois, size: int, scale: float):
    """Approximate aligned RoIAlign by `grid_sample` on a 2x2 grid per bin (CPU smoke run only).

    Args:
      features: [B, C, H, W]; rois: [R, 5] (batch index, x1, y1, x2, y2); size: output side; scale: 1/stride.

    Returns:
      [R, C, size, size].
    """
    grid = 2
    _, _, height, width = features.shape
    boxes = rois[:, 1:] * scale - 0.5  # [R, 4] in feature pixels, pixel centres at integers
    steps = (torch.arange(size * grid, device=rois.device, dtype=rois.dtype) + 0.5) / (size * grid)
    xs = boxes[:, 0:1] + steps * (boxes[:, 2:3] - boxes[:, 0:1])  # [R, size * grid]
    ys = boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2])
    # grid_sample (align_corners=False) puts pixel i's centre at (2i + 1) / n - 1.
    gx = (2 * xs + 1) / width - 1
    gy = (2 * ys + 1) / height - 1
    sample = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [R, S*g, S*g, 2]
    picked = features[rois[:, 0].long()]  # [R, C, H, W]
    out = F.grid_sample(picked, sample.to(picked.dtype), mode="bilinear", align_corners=False)
    return F.avg_pool2d(out, grid)


def roi_align(features, rois, size: int, scale: float):
    """torchvision's aligned adaptive RoIAlign, or the smoke-run stand-in without torchvision."""
    if torchvision is None:
        return grid_roi_align(features, rois, size, scale)
    return tv_roi_align(features, rois, (size, size), spatial_scale=scale, sampling_ratio=0, aligned=True)


def conv_bn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """Conv (no bias) + BatchNorm, padding kernel // 2."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(cout))


class FPNEncoder(nn.Module):
    """ResNet -> FPN with BN -> RoIAlign 7x7 per level -> shared 4conv-2fc head: [B, 4, dim]."""

    def __init__(self, depth, width, fpn_dim, head_dim, fc_dim, dim):
        super().__init__()
        self.backbone = make_resnet(depth, width)
        kind = BLOCKS[depth][0]
        channels = [width * 2**i * EXPANSION[kind] for i in range(4)]
        self.laterals = nn.ModuleList(conv_bn(c, fpn_dim, 1) for c in channels)
        self.outputs = nn.ModuleList(conv_bn(fpn_dim, fpn_dim, 3) for _ in channels)
        convs, cin = [], fpn_dim
        for _ in range(4):
            convs += [conv_bn(cin, head_dim, 3), nn.ReLU(inplace=True)]
            cin = head_dim
        self.head_convs = nn.Sequential(*convs)
        self.head_fcs = nn.Sequential(nn.Linear(head_dim * 49, fc_dim), nn.ReLU(inplace=True),
                                      nn.Linear(fc_dim, fc_dim), nn.ReLU(inplace=True), nn.Linear(fc_dim, dim))

    def forward(self, images, boxes):
        """images [B, 3, H, W], boxes [B, 4, 4] (one per level) -> [B, 4, dim] normalised."""
        laterals = [lat(c) for lat, c in zip(self.laterals, stem_and_stages(self.backbone, images, 4))]
        for i in range(3, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        batch = images.shape[0]
        index = torch.arange(batch, device=images.device, dtype=torch.float32)[:, None]
        rois = [roi_align(out(p), torch.cat([index, boxes[:, i]], dim=1), 7, 1.0 / s)
                for i, (out, p, s) in enumerate(zip(self.outputs, laterals, FPN_STRIDES))]
        rois = torch.stack(rois, dim=1).flatten(0, 1)  # [B * 4, C, 7, 7], image-major
        x = self.head_fcs(self.head_convs(rois).flatten(1))
        return F.normalize(x.float().view(batch, 4, -1), dim=-1)


class C4Encoder(nn.Module):
    """ResNet to res4 -> RoIAlign 14x14 -> res5 -> global pool -> MLP: [B, 1, dim]."""

    def __init__(self, depth, width, mlp_dim, dim):
        super().__init__()
        self.backbone = make_resnet(depth, width)
        cout = width * 8 * EXPANSION[BLOCKS[depth][0]]
        self.projection = nn.Sequential(nn.Linear(cout, mlp_dim), nn.ReLU(inplace=True), nn.Linear(mlp_dim, dim))

    def forward(self, images, boxes):
        """images [B, 3, H, W], boxes [B, 1, 4] -> [B, 1, dim] normalised."""
        res4 = stem_and_stages(self.backbone, images, 3)[-1]
        index = torch.arange(images.shape[0], device=images.device, dtype=torch.float32)[:, None]
        rois = roi_align(res4, torch.cat([index, boxes[:, 0]], dim=1), 14, 1.0 / C4_STRIDE)
        pooled = self.backbone.layer4(rois).mean(dim=(2, 3))
        return F.normalize(self.projection(pooled).float(), dim=-1)[:, None]


def init_weights(encoder: nn.Module) -> nn.Module:
    """REFERENCE initialisation: convs normal(0, sqrt(2 / (k * k * out))), fcs Xavier-uniform with zero bias.

    Speed does not depend on it; it keeps the embeddings of an untrained encoder apart (torch's default
    init nearly collapses them), so the printed loss starts near 4 x log(1 + K) as ours does.
    """
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return encoder


def anchor_grid(image: int, stride: int = 16, base: int = 16, scales=(2, 4, 8, 16),
                ratios=(0.5, 0.75, 1.0, 1.5, 2.0)) -> torch.Tensor:
    """[A, 4] box-augmentation anchors (REFERENCE section 2): centres (16x, 16y), w = 16s/sqrt(r), h = 16s*sqrt(r)."""
    sizes = torch.tensor([(base * s / r**0.5, base * s * r**0.5) for s in scales for r in ratios])  # [S*R, 2]
    centres = torch.arange(0, image, stride, dtype=torch.float32)
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    c = torch.stack([cx.flatten(), cy.flatten()], dim=1)[:, None, :]  # [P, 1, 2]
    return torch.cat([c - sizes / 2, c + sizes / 2], dim=-1).reshape(-1, 4)


def box_iou(a, b):
    """[N, 4], [M, 4] -> [N, M] IoU."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def augment_boxes(boxes, anchors, iou_threshold=0.5, nms_threshold=0.7, top_k=4000):
    """One random NMS survivor among the anchors around each box: [B, 4] -> [B, 4]."""
    iou = box_iou(boxes, anchors)  # [B, A]
    candidate = iou > iou_threshold
    fallback = torch.zeros_like(candidate).scatter_(1, iou.topk(min(top_k, anchors.shape[0]), dim=1).indices, True)
    candidate = torch.where(candidate.any(dim=1, keepdim=True), candidate, fallback)
    sample, anchor = candidate.nonzero(as_tuple=True)
    scores = torch.rand(sample.shape, device=boxes.device)
    if torchvision is not None:
        keep = batched_nms(anchors[anchor], scores, sample, nms_threshold)
        sample, anchor = sample[keep], anchor[keep]
    # One survivor per sample, uniformly: the one with the largest fresh random key.
    key = torch.rand(sample.shape, device=boxes.device)
    best = torch.full((boxes.shape[0],), -1.0, device=boxes.device).scatter_reduce(0, sample, key, "amax")
    chosen = key == best[sample]
    out = boxes.clone()
    out[sample[chosen]] = anchors[anchor[chosen]]
    return out


class TrainStep:
    """Query encoder + momentum key encoder + queues + SGD: `step(batch)` runs one InsLoc step."""

    def __init__(self, encoder, args, batch: int, device):
        self.query = encoder.to(device, memory_format=memory_format(device))
        self.key = copy.deepcopy(self.query).requires_grad_(False)
        self.levels = 4 if args.arch == "fpn" else 1
        queue = torch.randn(self.levels, args.queue, args.embed_dim, device=device)
        self.queue = F.normalize(queue, dim=-1)
        self.ptr = 0
        self.anchors = anchor_grid(args.image).to(device)
        self.optimizer = torch.optim.SGD(self.query.parameters(), lr=0.03 * batch / 256, momentum=0.9,
                                         nesterov=True, weight_decay=1e-4)
        self.q_forward, self.k_forward = self.query, self.key
        if args.compiled:
            self.q_forward, self.k_forward = torch.compile(self.query), torch.compile(self.key)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
        self.params = (list(self.key.parameters()), list(self.query.parameters()))

    def __call__(self, images_q, boxes_q, images_k, boxes_k):
        """images [B, 3, H, W], boxes [B, 4] -> detached loss."""
        batch = images_q.shape[0]
        q_boxes = boxes_q[:, None].repeat(1, self.levels, 1)
        q_boxes[:, self.levels - 1] = augment_boxes(boxes_q, self.anchors)  # P5 for fpn, the box for c4
        k_boxes = boxes_k[:, None].repeat(1, self.levels, 1)
        with torch.no_grad():
            torch._foreach_mul_(self.params[0], 0.999)
            torch._foreach_add_(self.params[0], self.params[1], alpha=0.001)
            perm = torch.randperm(batch, device=images_k.device)
            with self.autocast:
                keys = self.k_forward(images_k[perm], k_boxes[perm])
            keys = keys[torch.argsort(perm)].float()  # [B, L, D]
        with self.autocast:
            queries = self.q_forward(images_q, q_boxes).float()  # [B, L, D]
        positive = (queries * keys).sum(-1, keepdim=True)  # [B, L, 1]
        negative = torch.einsum("bld,lkd->blk", queries, self.queue)  # [B, L, K]
        logits = torch.cat([positive, negative], dim=-1) / 0.2
        target = torch.zeros(batch * self.levels, dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits.flatten(0, 1), target) * self.levels  # sum over levels
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.queue[:, self.ptr:self.ptr + batch] = keys.transpose(0, 1)
        self.ptr = (self.ptr + batch) % self.queue.shape[1]
        return loss.detach()


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
    if args.arch == "fpn":
        encoder = FPNEncoder(args.depth, args.width, args.fpn_dim, args.head_dim, args.fc_dim, args.embed_dim)
    else:
        encoder = C4Encoder(args.depth, args.width, args.mlp_dim, args.embed_dim)
    step = TrainStep(init_weights(encoder), args, batch, device)
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
