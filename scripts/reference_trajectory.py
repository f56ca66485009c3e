"""The JAX train step and the independent PyTorch step of insloc_torch side by side, on the same data.

    python scripts/reference_trajectory.py [--arch fpn] [--steps 200] [--png trajectory.png] [--json out.json]
    python scripts/reference_trajectory.py --arch c4 --point 65536:4096 [--stats 256]   # a queue_ratio point

A small run (configs/tiny.py sizes: ResNet-18 width 8, 64x64 composites of the embedded dataset, 16
samples per step on 2 simulated devices, augmentation on the host, float32) starts from one initialisation
(JAX's, exported to torch) and takes every step in both implementations with the same batch and the same
random draws (shuffle permutation, box-augmentation scores and choices). Each implementation then follows
its own parameters, so the curves drift apart only as float32 rounding grows through training. Prints the
per-step losses every 20 steps and the largest divergence; writes both loss curves to a PNG.

`--point K:N` runs a point of `scripts/queue_ratio.py` instead: configs/demo.py's sizes (ResNet-18 width 32,
96x96, 32 samples per step) at the paper's recipe with a queue of K keys on the first N training images, BN
per simulated device (16 samples). `--stats NUM` then embeds NUM held-out instances with each
implementation's final encoders and prints `scripts/pretext_shortcut.py`'s statistics of level 0 for both, so
a collapse can be seen in either.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "scripts")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax import parallel  # noqa: E402
from insloc_jax.data.sources import open_source  # noqa: E402
from insloc_jax.train import make_batches  # noqa: E402
from reference.from_jax import jax_run, method_config, nchw, reference_run, reference_step  # noqa: E402

DEVICES = 2


def tiny_config(arch: str, base_lr: float):
    """configs/tiny.py as `arch`'s method, 16 samples per step, `base_lr` (the default run)."""
    config = method_config(arch, 16)
    config.optim.base_lr = base_lr
    return config


def point_config(arch: str, point: str, seed: int = 0):
    """A `queue_ratio.py` point "K:N" of `arch`'s method, BN per device (what the reference simulates)."""
    from configs import methods
    from queue_ratio import point_config as paper_point

    queue, images = (int(v) for v in point.split(":"))
    demo = config_lib.load_config_file(os.path.join(ROOT, "configs", "demo.py"))
    config = methods.apply(paper_point(demo, queue, images, seed), methods.BY_ARCH[arch])
    config.train.bn_group_size = 0
    return config


def run(config, steps: int, dtype: str, stats: int = 0):
    """{"jax": [steps] losses, "torch": [steps] losses, "lr": [steps]} of `steps` steps of `config` in both,
    with {"stats": {"jax": ..., "torch": ...}} of `stats` held-out instances when `stats`."""
    with jax.enable_x64(dtype == "float64"):
        return _run(config, steps, dtype, stats)


def _run(config, steps, dtype, stats):
    config.model.dtype = dtype
    config.train.total_steps = steps
    config.data.augment_on = "host"
    source = open_source(config_lib.source_spec(config))
    derived = config_lib.derive(config, DEVICES, source.num_examples)
    state, step_fn, schedule, anchors = jax_run(config, DEVICES, source.num_examples)
    ref = reference_run(config, state, DEVICES, torch.float64 if dtype == "float64" else torch.float32)
    batches = make_batches(config, derived, source, 0, local_devices=DEVICES)  # tiny: in this process
    replicated = parallel.replicate(state, jax.local_devices()[:DEVICES])
    out = {"jax": [], "torch": [], "lr": []}
    for step in tqdm(range(steps), desc=f"{config.model.arch}: JAX and torch steps"):
        batch = next(batches)
        batch = dict(batch, image1=batch["image1"].astype(dtype), image2=batch["image2"].astype(dtype))
        replicated, metrics = step_fn(replicated, {k: batch[k] for k in ("image1", "image2", "boxes1", "boxes2")})
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
        lr = float(schedule(step))
        theirs = reference_step(ref, flat, state.rng, step, anchors, lr)
        out["jax"].append(float(parallel.unreplicate(metrics)["loss"]))
        out["torch"].append(theirs["loss"])
        out["lr"].append(lr)
    if stats:
        out["stats"] = final_stats(config, jax.device_get(parallel.unreplicate(replicated)), ref, stats)
    return out


def final_stats(config, state, ref, num: int):
    """`pretext_shortcut.shortcut_stats` of level 0 on `num` held-out instances for the JAX host state and
    the reference: queries of view 1 by each query encoder, keys of view 2 by each key encoder, each
    implementation's queue (BatchNorm in train mode over batches of train.global_batch, both)."""
    from pretext_shortcut import embed_views, shortcut_stats

    from insloc_jax.eval import data as probe_data

    data = probe_data.load_probe_data(config, probe_data.Settings.from_config(config))
    queries, keys = embed_views(config, state, data, num)
    out = {"jax": shortcut_stats(queries[:, 0], keys[:, 0], np.asarray(state.queues)[0])}
    dtype, batch, levels = ref.queues.dtype, config.train.global_batch, ref.query.levels
    count = len(queries)

    def embed(model, view):
        model.train()
        with torch.no_grad():
            return torch.cat([
                model(nchw(data.composites[view, s:s + batch]).to(dtype),
                      torch.from_numpy(np.array(data.boxes[view, s:s + batch])).to(dtype)[:, None].repeat(1, levels, 1))
                for s in range(0, count, batch)]).numpy()

    theirs_q, theirs_k = embed(ref.query, 0), embed(ref.key, 1)
    out["torch"] = shortcut_stats(theirs_q[:, 0], theirs_k[:, 0], ref.queues[0].numpy())
    return out


def plot(curves: dict, arch: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(curves["jax"]) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    top.plot(steps, curves["jax"], label="insloc_jax (JAX)", lw=1.5)
    top.plot(steps, curves["torch"], label="insloc_torch (PyTorch)", lw=1, ls="--")
    top.set_ylabel("loss")
    top.set_title(f"{arch}: the same run in both implementations")
    top.legend()
    bottom.semilogy(steps, np.abs(np.subtract(curves["jax"], curves["torch"])) + 1e-9)
    bottom.set_ylabel("|difference|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="fpn", choices=("fpn", "c4", "moco"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--base_lr", type=float, default=0.3, help="lr at batch 256 (0.019 at this batch)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--point", default="", help="K:N, a queue_ratio.py point (demo sizes, paper recipe)")
    parser.add_argument("--stats", type=int, default=0, help="held-out instances for the final statistics")
    parser.add_argument("--png", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    config = point_config(args.arch, args.point) if args.point else tiny_config(args.arch, args.base_lr)
    curves = run(config, args.steps, args.dtype, args.stats)
    jax_loss, torch_loss = np.array(curves["jax"]), np.array(curves["torch"])
    gap = np.abs(jax_loss - torch_loss)
    print("| step | JAX loss | torch loss | difference |\n|---|---|---|---|")
    for s in sorted(set(range(0, args.steps, 20)) | {args.steps - 1}):
        print(f"| {s + 1} | {jax_loss[s]:.5f} | {torch_loss[s]:.5f} | {jax_loss[s] - torch_loss[s]:+.2e} |")
    worst = int(np.argmax(gap))
    print(f"largest divergence: {gap[worst]:.2e} at step {worst + 1} ({gap[worst] / torch_loss[worst]:.2e} "
          f"relative); mean |difference| {gap.mean():.2e}; first 10 steps at most {gap[:10].max():.2e}")
    if args.stats:
        names = ("positive", "fresh_negative", "queue_negative", "query_spread", "top1_vs_queue", "top1_vs_fresh")
        print("| level 0 | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for impl in ("jax", "torch"):
            print(f"| {impl} | " + " | ".join(f"{curves['stats'][impl][n]:.3f}" for n in names) + " |")
    if args.png:
        plot(curves, args.arch, args.png)
        print(f"wrote {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(curves, f)


if __name__ == "__main__":
    main()
