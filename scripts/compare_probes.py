"""Pretrains InsLoc-FPN, InsLoc-C4 and MoCo-v2 for the same steps and compares their frozen-feature probes.

    python scripts/compare_probes.py --config configs/demo.py --workdir /tmp/probes --steps 2000 \
        --eval_every 500 [--methods insloc_fpn,insloc_c4,mocov2] [--png probes.png]

Each method trains from the same config with its own overrides (as configs/insloc_c4_200ep.py and
configs/mocov2_200ep.py do) in WORKDIR/<method>, keeping a checkpoint every `eval_every` steps; rerunning
resumes. Step 0 of every curve is that method's untrained initialisation. Every evaluated point is written to
WORKDIR/<method>/eval/step_<N>.json; the script then writes WORKDIR/probes.json, draws probe metric vs step
(one line per method) to the PNG and prints a markdown table of the random and final points.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax import evaluate, probe_data  # noqa: E402
from insloc_jax.state import load_query_variables  # noqa: E402

METHODS = {
    "insloc_fpn": dict(arch="fpn", mode="insloc", levels=(3,), nesterov=True, label="InsLoc-FPN"),
    "insloc_c4": dict(arch="c4", mode="insloc", levels=(0,), nesterov=True, label="InsLoc-C4"),
    "mocov2": dict(arch="moco", mode="moco", levels=(), nesterov=False, label="MoCo-v2"),
}
PLOTTED = (("retrieval_top1", "instance retrieval top-1"), ("knn_top1", "kNN top-1 (k=20)"),
           ("box_iou_after", "box probe mean IoU"))


def method_config(path: str, method: str, steps: int, eval_every: int):
    """The run config of one method: the file's config with that method's arch, data mode and box levels."""
    config = config_lib.load_config_file(path)
    spec = METHODS[method]
    config.model.arch = spec["arch"]
    config.data.mode = spec["mode"]
    config.box_aug.levels = spec["levels"]
    config.optim.nesterov = spec["nesterov"]
    config.train.total_steps = steps
    config.train.checkpoint_every = eval_every
    config.train.keep_checkpoints = steps // eval_every + 1  # keep every evaluated step
    return config


def run_method(config, workdir: str, data, settings) -> dict:
    """Trains (or resumes) one method and evaluates step 0 (random init) and every checkpoint."""
    from insloc_jax.train import train
    from insloc_jax.checkpoint import Checkpointer

    train(config, workdir)
    extractors = evaluate.make_extractors(config_lib.make_encoder(config))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    steps = checkpointer.steps()
    checkpointer.close()
    results = {}
    for step in [0] + steps:
        if step == 0:
            variables = evaluate.random_variables(config)
        else:
            variables, _, _ = load_query_variables(workdir, step, config)
        results[step] = evaluate.run_probes(extractors, variables, data, settings)
        evaluate.write_results(workdir, step, results[step])
        print(f"  step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in results[step].items()), flush=True)
    return results


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
    """Markdown: one row per method at random init and at its last step."""
    head = ["model", "step", "retrieval top-1", "kNN top-1", "box IoU before", "box IoU after",
            "box IoU, coordinates only"]
    keys = ("retrieval_top1", "knn_top1", "box_iou_before", "box_iou_after", "box_iou_geometry")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, points in results.items():
        for step, name in ((0, "random init"), (max(points), "pretrained")):
            cells = [f"{points[step][k]:.3f}" if k in points[step] else "-" for k in keys]
            rows.append(f"| {METHODS[method]['label']} ({name}) | {step} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.py", help="base run config file")
    parser.add_argument("--workdir", required=True, help="one sub-directory per method goes here")
    parser.add_argument("--steps", type=int, required=True, help="pretraining steps of every method")
    parser.add_argument("--eval_every", type=int, required=True, help="steps between evaluated checkpoints")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--png", default="", help="plot path (default WORKDIR/probes.png)")
    args = parser.parse_args()
    if not os.path.isfile(args.config):
        parser.error(f"config file {args.config} does not exist; pass --config (e.g. configs/tiny.py)")
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")

    # The probe data depends only on the data fields, which the methods share: build it once.
    first = method_config(args.config, methods[0], args.steps, args.eval_every)
    settings = probe_data.Settings.from_config(first)
    data = probe_data.load_probe_data(first, settings)
    results = {}
    for method in methods:
        print(f"{METHODS[method]['label']}: {args.steps} steps", flush=True)
        config = method_config(args.config, method, args.steps, args.eval_every)
        results[method] = run_method(config, os.path.join(args.workdir, method), data, settings)

    with open(os.path.join(args.workdir, "probes.json"), "w", encoding="utf-8") as f:
        json.dump({m: {str(s): v for s, v in points.items()} for m, points in results.items()}, f, indent=2)
    png = args.png or os.path.join(args.workdir, "probes.png")
    plot(results, png)
    print(table(results))
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
