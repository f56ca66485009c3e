"""Pretrains InsLoc-FPN, InsLoc-C4 and MoCo-v2 for the same steps and compares their frozen-feature probes.

    python scripts/compare_probes.py --config configs/demo.py --workdir /tmp/probes --steps 2000 \
        --eval_every 500 [--methods insloc_fpn,insloc_c4,mocov2] [--png probes.png] \
        [--config.contrast.queue_size=1024 ...]

Each method trains from the same config (the file's, with any `--config.<field>=<value>` overrides, as in
`insloc_jax.train`) with its own overrides (as configs/insloc_c4_200ep.py and
configs/mocov2_200ep.py do) in WORKDIR/<method>, keeping a checkpoint every `eval_every` steps; rerunning
resumes. Step 0 of every curve is that method's untrained initialisation. Every evaluated point is written to
WORKDIR/<method>/eval/step_<N>.json (per-item scores in step_<N>.npz); the script then writes
WORKDIR/probes.json, draws probe metric vs step (one line per method) to the PNG and prints a markdown table
of the random and final points. Every pretrained point also carries its paired difference from random init
on the same held-out items and that difference's standard error (`<metric>_vs_random`, `..._se`), so a
margin can be read against its noise; a second table pairs each method's last step with MoCo-v2's.
"""
import json
import logging
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.methods import METHODS, apply as apply_method  # noqa: E402
from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax.eval import data as probe_data, features, probes, run as evaluate  # noqa: E402
from insloc_jax.state import load_query_variables  # noqa: E402

COMPARED = ("retrieval_top1", "knn_top1", "box_iou_after")  # paired with random init in the table
PLOTTED = (("retrieval_top1", "instance retrieval top-1"), ("knn_top1", "kNN top-1 (k=20)"),
           ("box_iou_after", "box probe mean IoU"))


def method_config(base: ml_collections.ConfigDict, method: str, steps: int, eval_every: int):
    """The run config of one method: a copy of `base` with that method's arch, data mode and box levels."""
    config = base.copy_and_resolve_references()
    config.unlock()
    apply_method(config, method)
    config.train.total_steps = steps
    config.train.checkpoint_every = eval_every
    config.train.keep_checkpoints = steps // eval_every + 1  # keep every evaluated step
    # This script probes every checkpoint itself and exports nothing; the demo's end-of-run extras are off.
    config.train.report = False
    config.train.export_format = ""
    return config


def run_method(config, workdir: str, data, settings):
    """Trains (or resumes) one method and evaluates step 0 (random init) and every checkpoint.

    Returns:
      ({step: metrics}, per-item scores of the last step).
    """
    from insloc_jax.train import train
    from insloc_jax.checkpoint import Checkpointer

    train(config, workdir)
    extractors = features.make_extractors(config_lib.make_encoder(config))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    steps = checkpointer.steps()
    checkpointer.close()
    results, items = {}, {}
    for step in [0] + steps:
        if step == 0:
            variables = evaluate.random_variables(config)
        else:
            variables, _, _ = load_query_variables(workdir, step, config)
        results[step], items[step] = evaluate.score_probes(extractors, variables, data, settings)
        if step:
            results[step].update(paired_columns(items[0], items[step]))
        evaluate.write_results(workdir, step, results[step], items[step])
        print(f"  step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in results[step].items()), flush=True)
    return results, items[max(items)]


def paired_differences(baseline: dict, items: dict) -> dict:
    """{metric: (mean of items - baseline, standard error)} for each compared metric both have, paired on the
    same held-out items (`probes.paired_difference`)."""
    return {key: probes.paired_difference(baseline[key], items[key])
            for key in COMPARED if key in baseline and key in items}


def paired_columns(random_items: dict, items: dict) -> dict:
    """A pretrained point's paired differences from random init, as result columns.

    Args:
      random_items: per-item scores (`evaluate.score_probes`) of the untrained model.
      items: per-item scores of a pretrained checkpoint.

    Returns:
      {"<metric>_vs_random", "<metric>_vs_random_se"} for each compared metric both have, and
      {"box_iou_after_vs_geometry", "box_iou_after_vs_geometry_se"}: the box probe on features against the
      same probe on the box coordinates alone.
    """
    out = {}
    for key, (mean, se) in paired_differences(random_items, items).items():
        out[f"{key}_vs_random"], out[f"{key}_vs_random_se"] = mean, se
    out["box_iou_after_vs_geometry"], out["box_iou_after_vs_geometry_se"] = probes.paired_difference(
        items["box_iou_geometry"], items["box_iou_after"])
    return out


def ordering_table(last_items: dict, baseline: str = "mocov2") -> str:
    """Markdown: each other method's last step minus the baseline's, paired on the same held-out items.

    Every method is probed on the same data (built once in `main`), so the per-item scores line up and the
    orderings the comparison asks about (InsLoc against MoCo-v2) get standard errors of their own.

    Args:
      last_items: {method: per-item scores of its last step}.
      baseline: the method subtracted; without it (or without another method) there is no table, "".
    """
    if baseline not in last_items or len(last_items) < 2:
        return ""
    rows = [f"| last step minus {METHODS[baseline]['label']} | " + " | ".join(COMPARED) + " |",
            "|" + "---|" * (len(COMPARED) + 1)]
    for method, items in last_items.items():
        if method != baseline:
            differences = paired_differences(last_items[baseline], items)
            cells = [f"{differences[k][0]:+.3f} ± {differences[k][1]:.3f}" if k in differences else "-"
                     for k in COMPARED]
            rows.append(f"| {METHODS[method]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict, path: str) -> None:
    """Probe metric vs step, one line per method, with retrieval chance and the box probe's two baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 4))
    for ax, (key, title) in zip(axes, PLOTTED):
        for method, points in results.items():
            steps = sorted(points)
            if all(key in points[s] for s in steps):
                ax.plot(steps, [points[s][key] for s in steps], marker="o", label=METHODS[method]["label"],
                        color=f"C{list(METHODS).index(method)}")  # one colour per method in every plot
        first = next(iter(results.values()))[0]
        if key == "retrieval_top1":
            ax.axhline(first["retrieval_chance"], color="gray", linestyle=":", label="chance")
        if key == "box_iou_after":
            ax.axhline(first["box_iou_before"], color="gray", linestyle="--", label="jittered box")
            if "box_iou_geometry" in first:  # the same probe on box coordinates alone
                ax.axhline(first["box_iou_geometry"], color="black", linestyle="-.", label="box coordinates only")
        ax.set_title(title)
        ax.set_xlabel("pretraining step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    """Markdown: one row per method at random init and at its last step.

    A pretrained cell of a compared metric also shows its paired difference from random init and that
    difference's standard error, "0.127 (+0.104 ± 0.016)", when the results carry them (`paired_columns`);
    the last column is the box probe's paired difference from the coordinates-only probe.
    """
    head = ["model", "step", "retrieval top-1", "kNN top-1", "box IoU before", "box IoU after",
            "box IoU, coordinates only", "box IoU after - coordinates only"]
    keys = ("retrieval_top1", "knn_top1", "box_iou_before", "box_iou_after", "box_iou_geometry",
            "box_iou_after_vs_geometry")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, points in results.items():
        for step, name in ((0, "random init"), (max(points), "pretrained")):
            cells = [_cell(points[step], key) for key in keys]
            rows.append(f"| {METHODS[method]['label']} ({name}) | {step} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cell(point: dict, key: str) -> str:
    """One table cell: the value, with its paired difference and standard error where the point has them."""
    if key == "box_iou_after_vs_geometry":
        return f"{point[key]:+.3f} ± {point[key + '_se']:.3f}" if key in point else "-"
    if key not in point:
        return "-"
    if f"{key}_vs_random" in point:
        return f"{point[key]:.3f} ({point[key + '_vs_random']:+.3f} ± {point[key + '_vs_random_se']:.3f})"
    return f"{point[key]:.3f}"


def main(argv) -> None:
    del argv
    from absl import flags

    args = flags.FLAGS
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax reports every file it reads at INFO
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: unknown methods {unknown}; choose from {sorted(METHODS)}")

    # The probe data depends only on the data fields, which the methods share: build it once.
    first = method_config(args.config, methods[0], args.steps, args.eval_every)
    settings = probe_data.Settings.from_config(first)
    data = probe_data.load_probe_data(first, settings)
    results, last_items = {}, {}
    for method in methods:
        print(f"{METHODS[method]['label']}: {args.steps} steps", flush=True)
        config = method_config(args.config, method, args.steps, args.eval_every)
        results[method], last_items[method] = run_method(config, os.path.join(args.workdir, method), data,
                                                         settings)

    with open(os.path.join(args.workdir, "probes.json"), "w", encoding="utf-8") as f:
        json.dump({m: {str(s): v for s, v in points.items()} for m, points in results.items()}, f, indent=2)
    png = args.png or os.path.join(args.workdir, "probes.png")
    plot(results, png)
    print(table(results))
    print(ordering_table(last_items))
    print(f"plot: {png}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "base run config file, e.g. configs/demo.py", lock_config=True)
    flags.DEFINE_string("workdir", None, "one sub-directory per method goes here")
    flags.DEFINE_integer("steps", None, "pretraining steps of every method")
    flags.DEFINE_integer("eval_every", None, "steps between evaluated checkpoints")
    flags.DEFINE_string("methods", ",".join(METHODS), "comma-separated subset of " + ",".join(METHODS))
    flags.DEFINE_string("png", "", "plot path (default WORKDIR/probes.png)")
    flags.mark_flags_as_required(["config", "workdir", "steps", "eval_every"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
