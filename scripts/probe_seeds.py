"""Probe differences between methods over several training seeds, from compare_probes.py's saved results.

    python scripts/probe_seeds.py --runs 0=docs/probes_demo.json,1=docs/probes_demo_seed1.json,\
2=docs/probes_demo_seed2.json,2=docs/probes_demo_seed2_c4.json [--step 4500] [--baseline mocov2]

Each `SEED=FILE` names one results file of `compare_probes.py` (its WORKDIR/probes.json,
{method: {step: metrics}}, or one method's {"method", "seed", "command", "steps": {step: metrics}}); files
of the same seed are merged. For every method other than the baseline and every probe metric, the table
gives the metric at `--step` minus the baseline method's on each seed, then the mean over seeds and its
standard error (sample standard deviation / sqrt(seeds)); a second table gives each method minus its own
random initialisation (step 0). Unlike the per-item standard errors compare_probes prints, these cover
training runs: how far a seed moves the difference.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.methods import METHODS  # noqa: E402
from insloc_jax.eval import probes  # noqa: E402

METRICS = ("retrieval_top1", "knn_top1", "box_iou_after")


def load_results(path: str) -> dict:
    """{method: {step (int): metrics}} of one saved results file, in either of compare_probes' layouts."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "steps" in data and "method" in data:
        data = {data["method"]: data["steps"]}
    return {method: {int(step): point for step, point in steps.items()} for method, steps in data.items()}


def load_seeds(specs: list) -> dict:
    """{seed: {method: {step: metrics}}} from "SEED=FILE" strings; a method given twice for a seed is an error."""
    seeds = {}
    for spec in specs:
        seed, sep, path = spec.partition("=")
        if not sep or not seed.strip().lstrip("-").isdigit():
            raise SystemExit(f"error: run {spec!r} is not SEED=FILE")
        merged = seeds.setdefault(int(seed), {})
        for method, steps in load_results(path).items():
            if method in merged:
                raise SystemExit(f"error: seed {seed} has {method} twice (again in {path})")
            merged[method] = steps
    return seeds


def seed_differences(seeds: dict, method: str, baseline: str, metric: str, step: int) -> dict:
    """{seed: method's metric at `step` minus baseline's} for the seeds that have both.

    `baseline` "random" is the method's own step 0 on that seed.
    """
    out = {}
    for seed, methods in sorted(seeds.items()):
        point = methods.get(method, {}).get(step, {})
        ref = methods.get(method, {}).get(0, {}) if baseline == "random" else methods.get(baseline, {}).get(step, {})
        if metric in point and metric in ref:
            out[seed] = point[metric] - ref[metric]
    return out


def label(method: str) -> str:
    """A method's name in tables (configs/methods.py), or the key itself for one it does not know."""
    return METHODS.get(method, {}).get("label", method)


def mean_and_se(values) -> tuple:
    """(mean, standard error of the mean) of per-seed values; the error is nan for fewer than two."""
    values = np.asarray(list(values), dtype=np.float64)
    return probes.paired_difference(np.zeros_like(values), values)  # the same estimate, seeds as the items


def table(seeds: dict, baseline: str, step: int) -> str:
    """Markdown: one row per (method, metric), a column per seed and the mean ± SE over seeds."""
    seed_ids = sorted(seeds)
    methods = sorted({m for methods in seeds.values() for m in methods} - {baseline})
    against = "its random init" if baseline == "random" else label(baseline)
    rows = [f"| step {step}, minus {against} | metric | " + " | ".join(f"seed {s}" for s in seed_ids)
            + " | mean ± SE over seeds |",
            "|---|---|" + "---|" * (len(seed_ids) + 1)]
    for method in methods:
        for metric in METRICS:
            diffs = seed_differences(seeds, method, baseline, metric, step)
            if not diffs:
                continue
            cells = [f"{diffs[s]:+.3f}" if s in diffs else "-" for s in seed_ids]
            mean, se = mean_and_se(diffs.values())
            summary = f"{mean:+.3f} ± {se:.4f} ({len(diffs)})" if len(diffs) > 1 else f"{mean:+.3f} (1)"
            rows.append(f"| {label(method)} | {metric} | " + " | ".join(cells) + f" | {summary} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="comma-separated SEED=FILE results of compare_probes.py")
    parser.add_argument("--step", type=int, default=4500, help="the compared step of every run")
    parser.add_argument("--baseline", default="mocov2", help="the method every other is compared with")
    args = parser.parse_args(argv)
    seeds = load_seeds(args.runs.split(","))
    print(table(seeds, args.baseline, args.step))
    print()
    print(table(seeds, "random", args.step))


if __name__ == "__main__":
    main(sys.argv[1:])
