"""Train-step benchmark: compile time, step time, samples/s, FLOPs per sample and MFU.

    python scripts/benchmark.py --config configs/insloc_fpn_200ep.py [--config.model.arch=c4 ...]
        [--per_device_batch 32,64,128] [--dtype float32,bfloat16] [--steps 20] [--end_to_end] [--profile DIR]
    python scripts/benchmark.py --config configs/insloc_c4_200ep.py --analytic

The run is built from the config as `insloc_jax.train` builds it (config.derive for `--num_examples`
images, make_encoder, make_optimizer, create_state, train_step, compile_step, replicated state) on every
local device. The step is timed on a synthetic batch already on the devices: normalised Gaussian images
(uint8 images plus augmentation parameters when `data.augment_on` is "device") and valid random boxes whose
sides are drawn from `data.fg_size_range`. Nothing on this path imports TensorFlow, and where
`ml_collections` is missing the config files still load (through a small stand-in for ConfigDict).

Printed per (batch, dtype): compile time, the median of synchronised step times and the mean of back-to-back
steps, samples/s per device, FLOPs per sample from XLA's cost analysis of the lowered step (its HLO before
optimisation, which counts the same on every backend) and from the analytic counter (`insloc_jax.flops`), and
MFU against the device's dense peak (bf16, or TF32 for float32, which XLA uses for float32 convolutions and
matmuls on NVIDIA GPUs by default). `--steps 0` compiles and reports FLOPs only. `--end_to_end` then feeds
the same step from the real input pipeline (`data/pipeline.py`, TensorFlow) and reports whether it keeps up.
`--profile DIR` also traces two steps for TensorBoard / XProf.
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import os
import statistics
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run configs do `from configs import base`

import jax  # noqa: E402
import numpy as np  # noqa: E402

# (device kind substring, dense bf16 TFLOP/s, dense TF32 TFLOP/s); the first match wins.
PEAKS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.0, 494.0),
    ("H200", 989.0, 494.0),
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L4", 121.0, 60.0),
)


class _ConfigDict(dict):
    """Attribute-access dict standing in for `ml_collections.ConfigDict` on machines without it."""

    def __init__(self, initial=None, **kwargs):
        super().__init__()
        self.update(initial or {}, **kwargs)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def __setattr__(self, name, value):
        self[name] = value

    def update(self, other=(), **kwargs):
        for key, value in dict(other, **kwargs).items():
            self[key] = _ConfigDict(value) if isinstance(value, dict) and not isinstance(value, _ConfigDict) else value

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, _ConfigDict) else v for k, v in self.items()}


def load_config(path: str, overrides: list):
    """`get_config()` of a config file, with `--config.a.b=value` overrides (Python literals or strings)."""
    if importlib.util.find_spec("ml_collections") is None:
        shim = types.ModuleType("ml_collections")
        shim.ConfigDict = _ConfigDict
        sys.modules["ml_collections"] = shim
    from insloc_jax.config import load_config_file  # after the stand-in, which it imports

    config = load_config_file(path)
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise SystemExit(f"unrecognised argument {item!r}: overrides look like --config.model.arch=c4")
        dotted, text = item[len("--config."):].split("=", 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = getattr(node, name)
        setattr(node, leaf, value)
    return config


def peak_tflops(kind: str, dtype: str):
    """Dense peak TFLOP/s of the device for the compute dtype, or None when unknown (e.g. CPU)."""
    for name, bf16, tf32 in PEAKS:
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else tf32
    return None


def synthetic_batch(seed: int, devices: int, per_device: int, size: int, fg_range, on_device_aug: bool):
    """A batch as the pipeline lays it out, [devices, per_device, ...], put on the devices.

    Images: float32 N(0, 1) [D, B, S, S, 3] (normalised), or uint8 plus the augmentation parameters of
    `data/augment_jax.py` when the step augments on device. Boxes: float32 [D, B, 4] xyxy inside the canvas,
    sides uniform in fg_range.
    """
    from insloc_jax import parallel

    rng = np.random.default_rng(seed)
    lead = (devices, per_device)
    batch = {}
    for view in (1, 2):
        low, high = fg_range
        sides = rng.integers(low, min(high, size + 1), lead + (2,)).astype(np.float32)  # [D, B, 2] (w, h)
        corner = rng.uniform(0.0, 1.0, lead + (2,)).astype(np.float32) * (size - sides)
        batch[f"boxes{view}"] = np.concatenate([corner, corner + sides], axis=-1)
        if on_device_aug:
            batch[f"image{view}"] = rng.integers(0, 256, lead + (size, size, 3), dtype=np.uint8)
            batch[f"aug{view}_apply"] = rng.uniform(size=lead + (4,)) < np.array([0.8, 0.2, 0.5, 0.5])
            batch[f"aug{view}_factors"] = rng.uniform(0.6, 1.4, lead + (4,)).astype(np.float32)
            batch[f"aug{view}_order"] = np.argsort(rng.uniform(size=lead + (4,)), axis=-1).astype(np.int32)
            batch[f"aug{view}_sigma"] = rng.uniform(0.1, 2.0, lead).astype(np.float32)
        else:
            batch[f"image{view}"] = rng.standard_normal(lead + (size, size, 3), dtype=np.float32)
    sharding = jax.sharding.NamedSharding(parallel.local_mesh(), jax.sharding.PartitionSpec(parallel.AXIS))
    return jax.device_put(batch, sharding)


def build(config, num_examples: int):
    """(derived values, mapped step, replicated state) exactly as the training loop builds them."""
    from insloc_jax import config as config_lib
    from insloc_jax import parallel
    from insloc_jax.state import create_state
    from insloc_jax.step import compile_step, step_config, train_step

    derived = config_lib.derive(config, jax.device_count(), num_examples)
    encoder = config_lib.make_encoder(config, derived)
    tx, schedule = config_lib.make_optimizer(config, derived)
    # One jitted init instead of hundreds of op-by-op dispatches (matters on GPUs).
    init = jax.jit(lambda rng: create_state(encoder, tx, rng, derived.image_size, config.contrast.queue_size))
    state = init(jax.random.PRNGKey(config.seed))
    per_device = functools.partial(
        train_step, encoder=encoder, tx=tx, schedule=schedule,
        anchors=config_lib.anchors(config, derived.image_size), config=step_config(config),
    )
    return derived, compile_step(per_device, config.train.parallel), parallel.replicate(state)


def xla_flops(program) -> float:
    """FLOPs of one device's program (a `Lowered` or `Compiled` step) from XLA's cost analysis (0: none reported).

    Prefer the lowered program: its HLO still holds every convolution as an HLO op. The GPU backend's
    compiled program turns them into cuDNN custom calls, which its cost analysis does not count (on an H200
    it reported 1.3 of the 76.6 GFLOP per sample of InsLoc-FPN).
    """
    cost = program.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def time_steps(step, state, batch, steps: int, warmup: int):
    """(state, per-step seconds synchronised on each step, mean seconds of back-to-back steps, metrics)."""
    metrics = None
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    synced = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        synced.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, synced, (time.perf_counter() - start) / steps, metrics


def trace_steps(step, state, batch, directory: str, row: dict, steps: int = 2) -> str:
    """Traces `steps` steps with jax.profiler (TensorBoard / XProf format) and archives the trace; returns its path."""
    import shutil
    import tempfile

    name = f"{row['arch']}_{row['batch']}_{row['dtype']}"
    with tempfile.TemporaryDirectory() as scratch:
        with jax.profiler.trace(scratch):
            for _ in range(steps):
                state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
        os.makedirs(directory, exist_ok=True)
        return shutil.make_archive(os.path.join(directory, name), "gztar", scratch)


def end_to_end(config, derived, step_fn, state, steps: int, warmup: int):
    """(samples/s per device fed by the input pipeline, samples/s per device of the pipeline alone)."""
    from insloc_jax import parallel
    from insloc_jax.train import make_batches, open_training_source

    source = open_training_source(config)
    batches = parallel.prefetch_to_device(make_batches(config, derived, source, 0), size=2)
    metrics = None
    for _ in range(warmup):
        state, metrics = step_fn(state, next(batches))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, next(batches))
    jax.block_until_ready((state, metrics))
    fed = steps * derived.per_device_batch / (time.perf_counter() - start)
    host = make_batches(config, derived, source, warmup + steps)
    next(host)
    start = time.perf_counter()
    for _ in range(steps):
        next(host)
    alone = steps * derived.per_device_batch / (time.perf_counter() - start)  # a batch feeds every device
    return fed, alone


def print_analytic(config, image: int) -> None:
    """The analytic FLOP breakdown per sample."""
    from insloc_jax import flops

    counted = flops.step_from_config(config, image)
    m = config.model
    print(f"analytic FLOPs per sample: {m.arch} R{m.depth} width {m.width}, {image}x{image}, "
          f"queue {config.contrast.queue_size}")
    for part, value in counted.forward.items():
        print(f"  forward {part:<12} {value / 1e9:9.3f} G")
    print(f"  encoder forward      {counted.encoder_forward / 1e9:9.3f} G")
    print(f"  step (4 x forward)   {counted.model / 1e9:9.3f} G   conv + dense, query fwd+bwd + key fwd")
    print(f"  RoIAlign / forward   {counted.roi_align / 1e9:9.3f} G   separable matmul form")
    print(f"  logits / forward     {counted.logits / 1e9:9.3f} G")
    print(f"  step incl. both      {counted.total / 1e9:9.3f} G")


def run_one(config, args, batch_size: int, dtype: str, kind: str) -> dict:
    """Builds, compiles and times one (per-device batch, dtype); prints its block and returns its row."""
    from insloc_jax import flops

    config.model.dtype = dtype
    config.train.global_batch = batch_size * jax.device_count()
    derived, step_fn, state = build(config, args.num_examples)
    batch = synthetic_batch(config.seed, jax.local_device_count(), batch_size, derived.image_size,
                            tuple(config.data.fg_size_range), config.data.augment_on == "device")
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    analytic = flops.step_from_config(config, derived.image_size)
    measured = xla_flops(lowered) / batch_size
    peak = peak_tflops(kind, dtype)
    row = dict(arch=config.model.arch, batch=batch_size, dtype=dtype, compile_s=compile_s,
               analytic=analytic.model, xla=measured)
    print(f"--- {config.model.arch} R{config.model.depth} {derived.image_size}x{derived.image_size}, per-device "
          f"batch {batch_size}, {dtype}, {config.train.parallel}, augment on {config.data.augment_on}, "
          f"box aug levels {tuple(config.box_aug.levels)}, {jax.local_device_count()} x {kind}")
    print(f"compile              {compile_s:8.1f} s")
    if args.steps:
        state, synced, back_to_back, metrics = time_steps(compiled, state, batch, args.steps, args.warmup)
        median = statistics.median(synced)
        row.update(step_ms=median * 1e3, b2b_ms=back_to_back * 1e3, rate=batch_size / median,
                   b2b_rate=batch_size / back_to_back)
        print(f"step (median of {args.steps})  {median * 1e3:8.2f} ms   back-to-back {back_to_back * 1e3:.2f} ms")
        print(f"samples/s per device {row['rate']:8.1f}        back-to-back {row['b2b_rate']:.1f}")
        print(f"last loss            {float(np.asarray(metrics['loss'])[0]):8.4f}")
    print_flops(row, analytic, peak)
    if args.profile:
        print(f"profile              {trace_steps(compiled, state, batch, args.profile, row)}")
    if args.end_to_end:
        fed, alone = end_to_end(config, derived, step_fn, state, args.steps or 10, args.warmup)
        row.update(e2e=fed, pipeline=alone)
        print(f"end to end           {fed:8.1f} samples/s per device (input pipeline alone {alone:.1f})"
              + (f"; {fed / row['b2b_rate']:.2f} of the synthetic rate: {verdict(fed, alone, row['b2b_rate'])}"
                 if "b2b_rate" in row else ""))
    return row


def print_flops(row: dict, analytic, peak) -> None:
    """FLOPs per sample (analytic and XLA) and, once timed, MFU against `peak` TFLOP/s (None: unknown)."""
    print(f"FLOPs/sample         analytic {analytic.model / 1e9:.3f} G (conv+dense, 4 x fwd; "
          f"{analytic.total / 1e9:.3f} G with RoIAlign and logits), XLA {row['xla'] / 1e9:.3f} G, "
          f"XLA/analytic {row['xla'] / analytic.model:.3f}")
    if "rate" not in row:
        return
    if peak is None:
        print(f"MFU                  n/a (no peak known for this device); "
              f"{row['rate'] * analytic.model / 1e9:.1f} GFLOP/s achieved (analytic)")
        return
    row["mfu"] = row["rate"] * analytic.model / (peak * 1e12)
    row["mfu_xla"] = row["rate"] * row["xla"] / (peak * 1e12)
    print(f"MFU                  {100 * row['mfu']:.1f} % analytic, {100 * row['mfu_xla']:.1f} % XLA, "
          f"against {peak:.0f} TFLOP/s {'bf16' if row['dtype'] == 'bfloat16' else 'TF32'}")


def verdict(fed: float, alone: float, synthetic: float) -> str:
    """Whether the input pipeline keeps up with the step (rates in samples/s per device)."""
    if fed >= 0.95 * synthetic:
        return "keeps up"
    if alone < synthetic:
        return "the input pipeline is the bottleneck"
    # Each is fast enough alone, so they slow each other down: on a CPU backend they share the cores.
    return "slower than either alone: the pipeline and the step compete for the host CPU"


def summary(rows, kind: str) -> None:
    """One markdown table of every measured configuration (for BENCHMARKS.md)."""
    print("\n| device | arch | batch/device | dtype | compile s | step ms | samples/s/device | MFU | "
          "GFLOP/sample XLA | end to end samples/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        step = f"{r['step_ms']:.1f}" if "step_ms" in r else "-"
        rate = f"{r['rate']:.1f}" if "rate" in r else "-"
        mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "n/a"
        e2e = f"{r['e2e']:.1f}" if "e2e" in r else "-"
        print(f"| {kind} | {r['arch']} | {r['batch']} | {r['dtype']} | {r['compile_s']:.1f} | {step} | {rate} | "
              f"{mfu} | {r['xla'] / 1e9:.4g} | {e2e} |")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a run config file, e.g. configs/insloc_fpn_200ep.py")
    parser.add_argument("--per_device_batch", default="", help="comma list; default: the config's")
    parser.add_argument("--dtype", default="", help="comma list of float32 | bfloat16; default: the config's")
    parser.add_argument("--steps", type=int, default=20, help="timed steps; 0 = compile and FLOPs only")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    parser.add_argument("--num_examples", type=int, default=1281167, help="dataset size for config.derive")
    parser.add_argument("--end_to_end", action="store_true", help="also time the step fed by the input pipeline")
    parser.add_argument("--analytic", action="store_true", help="print the analytic FLOP breakdown and exit")
    parser.add_argument("--profile", default="", help="also trace 2 steps with jax.profiler into DIR, written "
                        "as DIR/<arch>_<batch>_<dtype>.tar.gz (one file, for machines that return only files)")
    return parser.parse_known_args(argv)


def main(argv=None):
    args, overrides = parse_args(argv)
    config = load_config(args.config, overrides)
    if args.analytic:
        image = config.data.moco_size if config.data.mode == "moco" else config.data.canvas_size
        print_analytic(config, image)
        return
    kind = jax.devices()[0].device_kind
    default_batch = config.train.global_batch // jax.device_count()
    batches = [int(b) for b in args.per_device_batch.split(",") if b] or [default_batch]
    dtypes = [d for d in args.dtype.split(",") if d] or [config.model.dtype]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s): {kind}")
    rows = [run_one(config, args, b, d, kind) for d in dtypes for b in batches]
    summary(rows, kind)


if __name__ == "__main__":
    main()
