"""The paper's transfer table in miniature: every initialisation fine-tuned into Mask R-CNN, paired over seeds.

    python scripts/finetune_table.py --pretrain 0=runs/table_pretrain_s0,1=runs/table_pretrain_s1 \
        [--detectors fpn,c4] [--seeds 0,1,2] [--schedules 1x,2x] [--step 4500] \
        [--workdir runs/table_finetune] [--out docs/finetune_table.json] [--dry_run] [--config.x=y ...]

`--pretrain SEED=DIR` names the workdir of `scripts/compare_probes.py` for one pretraining seed, which holds
one run per method (DIR/insloc_fpn, DIR/insloc_c4, DIR/mocov2). Each pretrained checkpoint (`--step`, the
newest by default) is exported once per detector (`--format torchvision_detection --arch <detector>`, into
the method's `export/`). The inits of each detector (INITS) are fine-tuned with every fine-tuning seed and
schedule by `python -m insloc_jax.finetune --config configs/finetune/demo.py`, the same iterations, batch
and lr for every init; random init does not depend on a pretraining seed and runs once per fine-tuning
seed. A run whose `metrics.json` already holds its last iteration is skipped and an interrupted one resumes,
so the script can be stopped and started again until the table is full. `--config.<field>=<value>` goes to
every fine-tune.

The table (printed as markdown, written with every run's numbers to `--out`) gives per detector, schedule
and init the mean box / mask AP, AP50 and AP75 over its runs, and the paired difference from random init
(the same fine-tuning seed) and from MoCo-v2 (the same pretraining and fine-tuning seeds), mean and
standard error of the per-pair differences.
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from insloc_jax.eval.probes import paired_difference  # noqa: E402

# detector -> (init name, pretraining method or None for random init, what of the export is loaded). A MoCo-v2
# or InsLoc-C4 export holds the ResNet alone, so "all" loads the whole ResNet; the C4 detector keeps res5 in
# its box head, outside `transfer=backbone`, so its MoCo-v2 init loads "all" to get its pretrained res5 too.
# InsLoc-FPN runs twice on the FPN detector: the ResNet alone, and with its FPN and box head.
INITS = {
    "fpn": (("random", None, None), ("mocov2", "mocov2", "all"), ("insloc_c4", "insloc_c4", "all"),
            ("insloc_fpn_backbone", "insloc_fpn", "backbone"), ("insloc_fpn", "insloc_fpn", "all")),
    "c4": (("random", None, None), ("mocov2", "mocov2", "all"), ("insloc_c4", "insloc_c4", "all")),
}
# The miniature's 1x (configs/finetune/base.py) and twice its iterations with the steps scaled alike.
SCHEDULES = {"1x": dict(iterations=2000, steps=(1500, 1800)), "2x": dict(iterations=4000, steps=(3000, 3600))}
COLUMNS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75")


@dataclasses.dataclass(frozen=True)
class Run:
    """One fine-tune of the table."""

    detector: str
    schedule: str
    init: str
    method: Optional[str]  # pretraining method, None for random init
    transfer: Optional[str]
    pretrain_seed: Optional[int]  # None for random init
    seed: int  # fine-tuning seed

    @property
    def name(self) -> str:
        pretrained = "" if self.pretrain_seed is None else f"_p{self.pretrain_seed}"
        return f"{self.detector}/{self.schedule}/{self.init}{pretrained}_s{self.seed}"


def plan(pretrain_seeds: Sequence[int], detectors: Sequence[str], seeds: Sequence[int],
         schedules: Sequence[str]) -> List[Run]:
    """Every run of the table, detector by detector (FPN first, so its part fills first)."""
    runs = []
    for detector in detectors:
        for schedule in schedules:
            for init, method, transfer in INITS[detector]:
                for pretrain_seed in ([None] if method is None else pretrain_seeds):
                    runs += [Run(detector, schedule, init, method, transfer, pretrain_seed, seed) for seed in seeds]
    return runs


def export_path(pretrain_dir: str, run: Run) -> str:
    return os.path.join(pretrain_dir, run.method, "export", f"{run.detector}.torchvision_detection.pth")


def ensure_export(pretrain_dir: str, run: Run, step: Optional[int]) -> str:
    """The run's export, written from the pretraining checkpoint if it is not there yet."""
    path = export_path(pretrain_dir, run)
    if not os.path.exists(path):
        from insloc_jax.export import export_run

        export_run(os.path.join(pretrain_dir, run.method), "torchvision_detection", path, step=step,
                   arch=run.detector)
    return path


def command(run: Run, workdir: str, weights: Optional[str], overrides: Sequence[str]) -> List[str]:
    """The fine-tuning command of `run`."""
    schedule = SCHEDULES[run.schedule]
    args = [sys.executable, "-m", "insloc_jax.finetune", "--config", os.path.join(ROOT, "configs", "finetune",
            "demo.py"), "--workdir", workdir, f"--config.arch={run.detector}", f"--config.seed={run.seed}",
            f"--config.schedule.iterations={schedule['iterations']}",
            f"--config.schedule.steps={tuple(schedule['steps'])}", "--config.schedule.eval_every=500"]
    if weights:
        args += [f"--config.weights={weights}", f"--config.transfer={run.transfer}"]
    return args + list(overrides)


def finished(workdir: str, iterations: int) -> Optional[dict]:
    """The run's metrics.json if it holds the last iteration, else None."""
    path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        metrics = json.load(f)
    return metrics if metrics.get("iteration") == iterations else None


def table(records: Sequence[dict]) -> List[dict]:
    """One row per (detector, schedule, init): means over runs and paired differences.

    Args:
      records: {"detector", "schedule", "init", "pretrain_seed", "seed", "metrics": {COLUMN: value}} per run.

    Returns:
      Rows {"detector", "schedule", "init", "runs", COLUMN: mean, "vs_random": {COLUMN: (mean, se, pairs)},
      "vs_mocov2": ...} (a comparison is left out where no pair exists).
    """
    groups: Dict[tuple, List[dict]] = {}
    for record in records:
        groups.setdefault((record["detector"], record["schedule"], record["init"]), []).append(record)
    rows = []
    for (detector, schedule, init), group in groups.items():
        row = {"detector": detector, "schedule": schedule, "init": init, "runs": len(group)}
        row.update({c: float(np.mean([r["metrics"][c] for r in group])) for c in COLUMNS})
        for baseline, key in (("random", lambda r: r["seed"]), ("mocov2", lambda r: (r["pretrain_seed"], r["seed"]))):
            paired = _paired(group, groups.get((detector, schedule, baseline), []), key)
            if paired and init != baseline:
                row[f"vs_{baseline}"] = paired
        rows.append(row)
    return rows


def _paired(group, baseline_group, key) -> Optional[dict]:
    """{COLUMN: (mean difference, standard error, pairs)} of `group` minus the baseline run with the same key."""
    baseline = {key(r): r for r in baseline_group}
    pairs = [(baseline[key(r)], r) for r in group if key(r) in baseline]
    if not pairs:
        return None
    return {c: (*paired_difference([b["metrics"][c] for b, _ in pairs], [r["metrics"][c] for _, r in pairs]),
                len(pairs)) for c in COLUMNS}


def markdown(rows: Sequence[dict]) -> str:
    """The table in the paper's form (AP in percent), with differences as mean ± standard error."""
    lines = ["| detector | schedule | init | runs | box AP | AP50 | AP75 | mask AP | AP50 | AP75 | box AP vs random "
             "| box AP vs MoCo-v2 | mask AP vs random | mask AP vs MoCo-v2 |", "|" + "---|" * 14]
    for row in rows:
        values = " | ".join(f"{100 * row[c]:.1f}" for c in COLUMNS)
        diffs = " | ".join(_diff(row.get(f"vs_{b}"), c) for c in ("bbox/AP", "segm/AP") for b in ("random", "mocov2"))
        lines.append(f"| {row['detector']} | {row['schedule']} | {row['init']} | {row['runs']} | {values} | {diffs} |")
    return "\n".join(lines)


def _diff(paired: Optional[dict], column: str) -> str:
    if not paired:
        return ""
    mean, se, count = paired[column]
    return f"{100 * mean:+.1f} ± {100 * se:.1f} ({count})" if count > 1 else f"{100 * mean:+.1f} (1)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain", required=True, help="SEED=DIR[,SEED=DIR...]: compare_probes workdirs")
    parser.add_argument("--detectors", default="fpn,c4")
    parser.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds")
    parser.add_argument("--schedules", default="1x")
    parser.add_argument("--step", type=int, default=None, help="pretraining checkpoint (default: newest)")
    parser.add_argument("--workdir", default="runs/table_finetune")
    parser.add_argument("--out", default="docs/finetune_table.json")
    parser.add_argument("--dry_run", action="store_true", help="print the commands of the runs still to do")
    args, overrides = parser.parse_known_args(argv)
    pretrain = {int(seed): path for seed, path in (item.split("=", 1) for item in args.pretrain.split(","))}
    runs = plan(sorted(pretrain), args.detectors.split(","), [int(s) for s in args.seeds.split(",")],
                args.schedules.split(","))
    records = []
    for run in runs:
        workdir = os.path.join(args.workdir, run.name)
        iterations = SCHEDULES[run.schedule]["iterations"]
        metrics = finished(workdir, iterations)
        if metrics is None:
            weights = None if run.method is None else (
                export_path(pretrain[run.pretrain_seed], run) if args.dry_run
                else ensure_export(pretrain[run.pretrain_seed], run, args.step))
            print(shlex.join(command(run, workdir, weights, overrides)), flush=True)
            if args.dry_run:
                continue
            subprocess.run(command(run, workdir, weights, overrides), cwd=ROOT, check=True)
            metrics = finished(workdir, iterations)
        records.append(dict(dataclasses.asdict(run), workdir=workdir, metrics=metrics))
    rows = table(records)
    print(markdown(rows))
    if not args.dry_run:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"runs": records, "table": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
