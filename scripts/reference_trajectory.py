"""The JAX train step and the independent PyTorch step of tests/reference side by side, on the same data.

    python scripts/reference_trajectory.py [--arch fpn] [--steps 200] [--png trajectory.png] [--json out.json]

A small run (configs/tiny.py sizes: ResNet-18 width 8, 64x64 composites of the embedded dataset, 16
samples per step on 2 simulated devices, augmentation on the host, float32) starts from one initialisation
(JAX's, exported to torch) and takes every step in both implementations with the same batch and the same
random draws (shuffle permutation, box-augmentation scores and choices). Each implementation then follows
its own parameters, so the curves drift apart only as float32 rounding grows through training. Prints the
per-step losses every 20 steps and the largest divergence; writes both loss curves to a PNG.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax import parallel  # noqa: E402
from insloc_jax.data.sources import open_source  # noqa: E402
from insloc_jax.train import make_batches  # noqa: E402
from reference.from_jax import jax_run, method_config, reference_run, reference_step  # noqa: E402

DEVICES = 2


def run(arch: str, steps: int, base_lr: float, dtype: str):
    """{"jax": [steps] losses, "torch": [steps] losses, "lr": [steps]} of `steps` steps in both."""
    with jax.enable_x64(dtype == "float64"):
        return _run(arch, steps, base_lr, dtype)


def _run(arch, steps, base_lr, dtype):
    config = method_config(arch, 16)
    config.model.dtype = dtype
    config.optim.base_lr = base_lr
    config.train.total_steps = steps
    config.data.augment_on = "host"
    source = open_source(config_lib.source_spec(config))
    derived = config_lib.derive(config, DEVICES, source.num_examples)
    state, step_fn, schedule, anchors = jax_run(config, DEVICES, source.num_examples)
    ref = reference_run(config, state, DEVICES, torch.float64 if dtype == "float64" else torch.float32)
    batches = make_batches(config, derived, source, 0, local_devices=DEVICES)  # tiny: in this process
    replicated = parallel.replicate(state, jax.local_devices()[:DEVICES])
    out = {"jax": [], "torch": [], "lr": []}
    for step in tqdm(range(steps), desc=f"{arch}: JAX and torch steps"):
        batch = next(batches)
        batch = dict(batch, image1=batch["image1"].astype(dtype), image2=batch["image2"].astype(dtype))
        replicated, metrics = step_fn(replicated, {k: batch[k] for k in ("image1", "image2", "boxes1", "boxes2")})
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
        lr = float(schedule(step))
        theirs = reference_step(ref, flat, state.rng, step, anchors, lr)
        out["jax"].append(float(parallel.unreplicate(metrics)["loss"]))
        out["torch"].append(theirs["loss"])
        out["lr"].append(lr)
    return out


def plot(curves: dict, arch: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(curves["jax"]) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    top.plot(steps, curves["jax"], label="insloc_jax (JAX)", lw=1.5)
    top.plot(steps, curves["torch"], label="tests/reference (PyTorch)", lw=1, ls="--")
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
    parser.add_argument("--png", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    curves = run(args.arch, args.steps, args.base_lr, args.dtype)
    jax_loss, torch_loss = np.array(curves["jax"]), np.array(curves["torch"])
    gap = np.abs(jax_loss - torch_loss)
    print("| step | JAX loss | torch loss | difference |\n|---|---|---|---|")
    for s in sorted(set(range(0, args.steps, 20)) | {args.steps - 1}):
        print(f"| {s + 1} | {jax_loss[s]:.5f} | {torch_loss[s]:.5f} | {jax_loss[s] - torch_loss[s]:+.2e} |")
    worst = int(np.argmax(gap))
    print(f"largest divergence: {gap[worst]:.2e} at step {worst + 1} ({gap[worst] / torch_loss[worst]:.2e} "
          f"relative); mean |difference| {gap.mean():.2e}; first 10 steps at most {gap[:10].max():.2e}")
    if args.png:
        plot(curves, args.arch, args.png)
        print(f"wrote {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(curves, f)


if __name__ == "__main__":
    main()
