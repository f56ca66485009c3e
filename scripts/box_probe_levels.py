"""The frozen box probe read from one feature level at a time, for trained runs and their random inits.

    python scripts/box_probe_levels.py --workdirs /tmp/probesQs2/mocov2,/tmp/probesQs2/insloc_fpn \
        [--step 4500] [--grids res3:4,res4:4,res5:4,res4:4+res5:2,p3:4,p4:4,p5:4] [--jitter 0.25,1.5] \
        [--out levels.json]

The default box probe (`insloc_jax.eval`) pools each jittered box's context window from res4 (4 x 4) and
res5 (2 x 2). This script refits the same ridge probe on the same held-out instances from other maps: a
grid spec is `name:side` terms joined by `+` (backbone res2..res5; FPN outputs p2..p5, skipped for runs
without an FPN). For every run and grid it prints box IoU after the probe for the checkpoint and its random
init, the paired difference between them, and each run's paired difference from the first run (all paired
per scored instance, with standard errors). Where a model's features lose the box's position relative to
another's, this shows at which level. `--jitter SHIFT,MAX_SCALE` redraws the starting boxes with another
strength (`probes.jitter_boxes`; the probes' own is 0.25,1.5, mean starting IoU about 0.61), to see whether
a gap depends on how far the starting box is from the truth.
"""
import argparse
import dataclasses
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax.eval import data as probe_data, features, probes, run as evaluate  # noqa: E402
from insloc_jax.state import load_query_variables  # noqa: E402

DEFAULT_GRIDS = "res3:4,res4:4,res5:4,res4:4+res5:2,p3:4,p4:4,p5:4"


def parse_grid(spec: str):
    """'res4:4+res5:2' -> (("res4", 4), ("res5", 2)); a clear error for anything else."""
    terms = []
    for term in spec.split("+"):
        name, _, side = term.partition(":")
        if name not in {f"{p}{i}" for p in ("res", "p") for i in range(2, 6)} or not side.isdigit() \
                or int(side) < 1:
            raise SystemExit(f"error: grid term {term!r} is not NAME:SIDE with NAME in res2..res5 / p2..p5")
        terms.append((name, int(side)))
    return tuple(terms)


def box_items(config, variables, data, settings, grids):
    """Per-scored-instance {"box_iou_after", "box_iou_geometry", "box_iou_before"} of the probe on `grids`."""
    extractors = features.make_extractors(config_lib.make_encoder(config), grids)
    _, items = evaluate.score_probes(extractors, variables, data, settings)
    return {k: v for k, v in items.items() if k.startswith("box_")}


def parse_jitter(spec: str):
    """'0.25,1.5' -> (0.25, 1.5): centre shift (fraction of the side) and largest side scale."""
    try:
        shift, max_scale = (float(x) for x in spec.split(","))
    except ValueError:
        raise SystemExit(f"error: --jitter {spec!r} is not SHIFT,MAX_SCALE (e.g. 0.25,1.5)") from None
    if not (0.0 <= shift and max_scale >= 1.0):
        raise SystemExit(f"error: --jitter {spec!r} needs SHIFT >= 0 and MAX_SCALE >= 1")
    return shift, max_scale


def rejitter(data, settings, canvas_size: int, shift: float, max_scale: float):
    """`data` with its starting boxes redrawn at another strength (same seed and layout as load_probe_data)."""
    jittered = probe_data.jittered_boxes(data.boxes, settings, canvas_size, shift, max_scale)
    return dataclasses.replace(data, jittered=jittered)


def paired(baseline, other):
    """{"mean", "se"} of other - baseline, per scored instance."""
    mean, se = probes.paired_difference(baseline, other)
    return {"mean": mean, "se": se}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdirs", required=True, help="comma-separated training workdirs; the first is "
                                                          "the baseline of the paired differences")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of every run (default: newest)")
    parser.add_argument("--grids", default=DEFAULT_GRIDS, help="comma-separated grid specs")
    parser.add_argument("--jitter", default="0.25,1.5", help="SHIFT,MAX_SCALE of the starting boxes")
    parser.add_argument("--out", default="", help="JSON file for the results")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.WARNING)
    workdirs = args.workdirs.split(",")
    grids = [(spec, parse_grid(spec)) for spec in args.grids.split(",")]
    shift, max_scale = parse_jitter(args.jitter)
    runs = []
    for workdir in workdirs:
        if not os.path.isdir(workdir):
            raise SystemExit(f"error: {workdir} is not a training workdir")
        variables, config, step = load_query_variables(workdir, args.step)
        runs.append((os.path.basename(os.path.normpath(workdir)), config, step, variables))

    # The runs share the probe data fields (as compare_probes' methods do); the kNN probe is not needed.
    settings = probe_data.Settings.from_config(runs[0][1])
    data = probe_data.load_probe_data(runs[0][1], settings)
    data = dataclasses.replace(data, labels=np.full_like(data.labels, -1))
    data = rejitter(data, settings, runs[0][1].data.canvas_size, shift, max_scale)
    start_iou = float(np.mean(probes.paired_iou(np.repeat(data.boxes.reshape(-1, 4), settings.jitters, axis=0),
                                                data.jittered.reshape(-1, 4))))
    print(f"jitter {shift},{max_scale}: mean starting IoU {start_iou:.3f}", flush=True)
    results = {}
    for spec, grid in grids:
        base_items = None
        for name, config, step, variables in runs:
            if any(n.startswith("p") for n, _ in grid) and config.model.arch != "fpn":
                continue
            trained = box_items(config, variables, data, settings, grid)
            untrained = box_items(config, evaluate.random_variables(config), data, settings, grid)
            row = {"step": step, "box_iou_after": float(np.mean(trained["box_iou_after"])),
                   "random_box_iou_after": float(np.mean(untrained["box_iou_after"])),
                   "vs_random": paired(untrained["box_iou_after"], trained["box_iou_after"]),
                   "vs_geometry": paired(trained["box_iou_geometry"], trained["box_iou_after"])}
            if name == runs[0][0]:
                base_items = trained["box_iou_after"]
            elif base_items is not None:
                row["vs_" + runs[0][0]] = paired(base_items, trained["box_iou_after"])
            results.setdefault(spec, {})[name] = row
            print(f"{spec:>16} {name:>12}: " + summary(row), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"command": " ".join(["python", "scripts/box_probe_levels.py"] + (argv or sys.argv[1:])),
                       "jitter": [shift, max_scale],
                       "start_iou": start_iou, "grids": results}, f, indent=2)


def summary(row: dict) -> str:
    """One printed line of a (grid, run) result."""
    parts = [f"IoU {row['box_iou_after']:.4f} (random {row['random_box_iou_after']:.4f})"]
    for key, value in row.items():
        if key.startswith("vs_"):
            parts.append(f"{key} {value['mean']:+.4f} ± {value['se']:.4f}")
    return ", ".join(parts)


if __name__ == "__main__":
    main()
