"""How much a tiny change of the initial weights moves the gradients of the PyTorch reference step.

    python scripts/reference_sensitivity.py [--relative 1e-12] [--steps 3]

The reference step of insloc_torch in float64 at configs/tiny.py sizes (8 random samples per step on 2
simulated devices, lr 0.094, key momentum 0.9, as tests/test_reference_step.py), run twice: from one
initialisation and from the same one with every weight multiplied by (1 + relative * N(0, 1)). Prints, per
arch and step, the largest and the median over parameters of |gradient change| / max |gradient|, divided by
`relative`: the factor by which the step amplifies a rounding-sized difference of the weights. It is what
sets the float32 tolerance of the differential test for each arch.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from parity import random_batches  # noqa: E402
from reference.from_jax import method_config, nchw, torch_encoder  # noqa: E402
from insloc_torch.step import TrainStep  # noqa: E402

ARCHS = ("fpn", "c4", "moco")


def gradients(arch, relative, steps, batches):
    """[steps] {parameter name: gradient} of the float64 reference from perturbed initial weights."""
    torch.manual_seed(0)
    encoder = torch_encoder(method_config(arch, 8).model).double()
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in encoder.parameters():
            p.mul_(1 + relative * torch.randn(p.shape, generator=noise, dtype=p.dtype))
    queues = torch.nn.functional.normalize(
        torch.randn(encoder.levels, 64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), dim=-1)
    step = TrainStep(encoder, queues, 2, 0.9, 0.2, ())  # true boxes on every level: no discrete choices
    out = []
    for s, batch in enumerate(batches[:steps]):
        boxes = torch.from_numpy(batch["boxes1"]).double()[:, None].repeat(1, encoder.levels, 1)
        step.step(nchw(batch["image1"]), boxes, nchw(batch["image2"]), torch.from_numpy(batch["boxes2"]).double(),
                  torch.randperm(8, generator=torch.Generator().manual_seed(s)), 0.094)
        out.append(dict(step.grads))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relative", type=float, default=1e-12)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    batches = random_batches(args.steps, 8, 64, np.float64)
    print(f"gradient change / max |gradient| per unit of relative weight change ({args.relative:g}), float64")
    print("| arch | step | largest | median |\n|---|---|---|---|")
    for arch in ARCHS:
        base, moved = gradients(arch, 0.0, args.steps, batches), gradients(arch, args.relative, args.steps, batches)
        for s, (a, b) in enumerate(zip(base, moved)):
            ratios = [float((a[k] - b[k]).abs().max() / a[k].abs().max()) / args.relative for k in a]
            print(f"| {arch} | {s + 1} | {max(ratios):.0f} | {np.median(ratios):.0f} |", flush=True)


if __name__ == "__main__":
    main()
