"""Fine-tuning speed on this machine: images/s of the miniature Mask R-CNN and where an iteration's time goes.

  python scripts/benchmark_finetune.py [--arch=fpn,c4] [--iterations=20] [--threads=0] [--config.x=y ...]

Builds the detector of configs/finetune/demo.py (or `--config FILE`, any field overridable), reads real
batches of the embedded detection set through the fine-tuning loop's own functions, and times each phase
of an iteration: reading the batch (decode, masks, flips), the forward pass split into backbone (+ FPN),
RPN and RoI heads, the backward pass and the SGD step. Then `torch.profiler` lists the operators with the
most self time over a few iterations. Nothing is asserted: the figures go to BENCHMARKS.md with the machine.
"""
import argparse
import collections
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class _PhaseTimer:
    """Wall time of the detector's parts, from forward pre-hooks (start) and forward hooks (end)."""

    def __init__(self, model):
        self.seconds = collections.defaultdict(float)
        parts = {"backbone": model.backbone, "rpn": model.rpn, "roi_heads": model.roi_heads}
        for name, module in parts.items():
            module.register_forward_pre_hook(lambda *_, n=name: self._start(n))
            module.register_forward_hook(lambda *_, n=name: self._stop(n))
        self._began = {}

    def _start(self, name):
        self._began[name] = time.perf_counter()

    def _stop(self, name):
        self.seconds[name] += time.perf_counter() - self._began.pop(name)


def benchmark(arch, config, iterations, warmup=3):
    """Per-phase seconds per iteration and images/s of `arch` on the config's data."""
    from insloc_jax.finetune import coco, loop, run

    config.arch = arch
    paths = run.data_paths(config)
    split = coco.load_split(*paths["train"])
    model = run.build(config, coco.num_classes(split))
    optimizer = loop.make_optimizer(model, config)
    timer = _PhaseTimer(model)
    totals = collections.defaultdict(float)
    for iteration in range(warmup + iterations):
        if iteration == warmup:
            totals.clear()
            timer.seconds.clear()
        model.train()
        began = time.perf_counter()
        examples, _ = loop.read_batch(split, config.seed, iteration, config.schedule.batch, True)
        images, targets = loop.to_tensors(examples)
        read = time.perf_counter()
        losses = model(images, targets)
        total = sum(losses.values())
        forward = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        backward = time.perf_counter()
        optimizer.step()
        done = time.perf_counter()
        for name, seconds in (("read batch", read - began), ("forward", forward - read),
                              ("backward", backward - forward), ("sgd step", done - backward)):
            totals[name] += seconds
    per_iteration = sum(totals.values()) / iterations
    parts = {f"  forward: {k}": v / iterations for k, v in timer.seconds.items()}
    return {k: v / iterations for k, v in totals.items()}, parts, config.schedule.batch / per_iteration, model, split


def top_ops(model, split, config, iterations=3, rows=12):
    """torch.profiler's table of the operators with the most self CPU time over a few training iterations."""
    import torch

    from insloc_jax.finetune import loop

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for iteration in range(iterations):
            examples, _ = loop.read_batch(split, config.seed, iteration, config.schedule.batch, True)
            images, targets = loop.to_tensors(examples)
            sum(model(images, targets).values()).backward()
    return profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv):
    del argv
    import torch
    from absl import flags

    args = flags.FLAGS
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    for arch in args.arch:
        config = args.config.copy_and_resolve_references()
        phases, parts, images_per_second, model, split = benchmark(arch, config, args.iterations)
        print(f"\n{arch}: {images_per_second:.1f} images/s ({config.schedule.batch} images per iteration)")
        for name, seconds in {**phases, **parts}.items():
            print(f"{name:<22} {seconds:7.3f} s/iteration")
        print(top_ops(model, split, config))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "finetune", "demo.py"),
                                    "a fine-tuning config")
    flags.DEFINE_list("arch", ["fpn", "c4"], "detectors to time")
    flags.DEFINE_integer("iterations", 20, "timed iterations (after 3 untimed ones)")
    flags.DEFINE_integer("threads", 0, "torch threads (0 = torch's default)")
    app.run(main)
