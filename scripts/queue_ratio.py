"""Collapse and probes against the queue's size over the dataset's (K / N), at the paper's recipe.

    python scripts/queue_ratio.py --workdir /tmp/queue_ratio [--steps 200] [--method insloc_c4] \
        [--points 192:4096,1024:4096,1024:1024,1024:256,65536:4096] [--seed 0] [--json out.json]

Every point K:N trains `configs/demo.py` (its sizes: ResNet-18 width 32, 96x96 composites, 32 samples per
step) on the first N images of the embedded training split with a queue of K keys and otherwise the
paper's recipe: key momentum 0.999, T 0.2, cosine learning rate from 0.03 x batch / 256 (per step, as the
run is shorter than an epoch at the larger N), no queue-filling steps (the queue starts as random unit
vectors), no batch negatives. When K > N the queue holds several keys of every image, so a query meets
older keys of its own image among its negatives; with K / N = 0.05 (the paper's 65,536 / 1.28 M) it never
does. Each point then gets:
  * the end of its training log: loss (its chance is log(K + 1) per level) and top-1 over the last 5 logs;
  * `scripts/pretext_shortcut.py`'s statistics of level 0 (spread 1 = every embedding one direction);
  * the probes of `compare_probes.py` (retrieval, kNN, box IoU) against the same method's random init,
    paired on the same held-out items, all points probed on the same data: the whole held-out split and a
    kNN bank of the first 4,096 training images, whatever N the point trained on.
A point's workdir is WORKDIR/K_N; rerunning resumes or reuses it. Prints one markdown table.
"""
import argparse
import json
import logging
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

# The fields where configs/demo.py departs from the paper's recipe; their values come from configs/base.py.
PAPER_FIELDS = (("contrast", "momentum"), ("contrast", "temperature"), ("contrast", "queue_fill_steps"),
                ("contrast", "batch_negatives"), ("optim", "base_lr"), ("optim", "schedule"))
PROBE_BANK = 4096  # training images of the kNN bank at every point (the embedded split's default size)


def point_config(base, queue: int, images: int, seed: int):
    """configs/demo.py with the paper's recipe, a queue of `queue` keys and the first `images` images."""
    from configs import base as paper

    config, recipe = base.copy_and_resolve_references(), paper.get_config()
    for section, field in PAPER_FIELDS:
        config[section][field] = recipe[section][field]
    config.optim.per_epoch = False  # cosine per step: at the larger N the run is shorter than an epoch
    config.contrast.queue_size = queue
    config.data.source.num_train = images
    config.seed = seed
    return config


def log_tail(workdir: str, last: int = 5):
    """(mean loss, mean top-1) of the last `last` logged steps of `workdir/metrics.jsonl`."""
    records = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                records[record["step"]] = record
    tail = [records[s] for s in sorted(records)[-last:]]
    top1 = [r[k] for r in tail for k in r if k.startswith("top1")]
    return float(np.mean([r["loss"] for r in tail])), float(np.mean(top1)) if top1 else float("nan")


def shortcut(workdir: str, config, data, num: int = 256):
    """`pretext_shortcut.shortcut_stats` of level 0 at the run's last checkpoint."""
    from pretext_shortcut import embed_views, shortcut_stats

    from insloc_jax.state import load_state

    state, _, _ = load_state(workdir, None, config)
    queries, keys = embed_views(config, state, data, num)
    return shortcut_stats(queries[:, 0], keys[:, 0], np.asarray(state.queues)[0])


def run_point(base, method, queue, images, args, data, settings):
    """Trains and measures one point; returns its row (a flat dict)."""
    import compare_probes

    config = compare_probes.method_config(point_config(base, queue, images, args.seed), method, args.steps,
                                          args.steps)
    workdir = os.path.join(args.workdir, f"{queue}_{images}")
    results, _ = compare_probes.run_method(config, workdir, data, settings)
    loss, top1 = log_tail(workdir)
    row = dict(queue=queue, images=images, ratio=queue / images, loss=loss, chance=float(np.log(queue + 1)),
               top1=top1, **shortcut(workdir, config, data))
    final = results[args.steps]
    for key in ("retrieval_top1", "knn_top1", "box_iou_after"):
        row[key], row[key + "_gain"], row[key + "_se"] = (final[key], final[key + "_vs_random"],
                                                          final[key + "_vs_random_se"])
    return row


def table(rows) -> str:
    """Markdown, one row per point."""
    head = ("K", "N", "K / N", "loss (chance)", "top-1", "spread", "positive", "fresh neg.", "queue neg.",
            "beats fresh keys", "retrieval vs random", "kNN vs random", "box IoU vs random")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        probes = [f"{r[k]:.3f} ({r[k + '_gain']:+.3f} ± {r[k + '_se']:.3f})"
                  for k in ("retrieval_top1", "knn_top1", "box_iou_after")]
        cells = [f"{r['queue']:,}", f"{r['images']:,}", f"{r['ratio']:.3g}", f"{r['loss']:.2f} ({r['chance']:.2f})",
                 f"{r['top1']:.2f}", f"{r['query_spread']:.3f}", f"{r['positive']:.3f}",
                 f"{r['fresh_negative']:.3f}", f"{r['queue_negative']:.3f}", f"{r['top1_vs_fresh']:.3f}"] + probes
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--method", default="insloc_c4", help="a method of configs/methods.py")
    parser.add_argument("--points", default="192:4096,1024:4096,1024:1024,1024:256,65536:4096",
                        help="comma-separated K:N (queue keys : training images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the rows here (default WORKDIR/queue_ratio.json)")
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.WARNING)

    from insloc_jax import config as config_lib
    from insloc_jax.eval import data as probe_data

    base = config_lib.load_config_file(os.path.join(os.path.dirname(HERE), "configs", "demo.py"))
    points = [tuple(int(v) for v in p.split(":")) for p in args.points.split(",")]
    probed = point_config(base, points[0][0], PROBE_BANK, args.seed)
    settings = probe_data.Settings.from_config(probed)
    data = probe_data.load_probe_data(probed, settings)  # the same held-out items and bank at every point
    rows = []
    for queue, images in points:
        print(f"K {queue}, N {images}: {args.steps} steps", flush=True)
        rows.append(run_point(base, args.method, queue, images, args, data, settings))
        print(table(rows[-1:]), flush=True)
    os.makedirs(args.workdir, exist_ok=True)
    with open(args.json or os.path.join(args.workdir, "queue_ratio.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
