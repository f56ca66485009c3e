"""scripts/finetune_table.py: the plan of runs and the paired table, against differences worked out by hand."""
import json
import os

import numpy as np
import pytest

from script_loader import load_script

table = load_script("finetune_table")


def test_plan_runs_random_init_once_per_seed_and_every_pretrained_init_per_pretraining_seed():
    runs = table.plan([0, 1], ["fpn", "c4"], [0, 1, 2], ["1x"])
    fpn = [r for r in runs if r.detector == "fpn"]
    assert len(fpn) == 3 + 4 * 2 * 3  # random once per fine-tuning seed; 4 pretrained inits x 2 x 3
    assert len([r for r in runs if r.detector == "c4"]) == 3 + 2 * 2 * 3
    assert runs[0].detector == "fpn"  # the FPN part fills first
    assert len({r.name for r in runs}) == len(runs)
    pair = {(r.init, r.transfer) for r in fpn if r.method == "insloc_fpn"}
    assert pair == {("insloc_fpn_backbone", "backbone"), ("insloc_fpn", "all")}


def test_command_sets_the_schedule_and_the_weights():
    run = table.Run("fpn", "2x", "insloc_fpn_backbone", "insloc_fpn", "backbone", 1, 2)
    args = table.command(run, "W", "E.pth", ["--config.data.num_val=8"])
    assert "--config.schedule.iterations=4000" in args and "--config.schedule.steps=(3000, 3600)" in args
    assert "--config.weights=E.pth" in args and "--config.transfer=backbone" in args and "--config.seed=2" in args
    assert args[-1] == "--config.data.num_val=8"
    random = table.command(table.Run("c4", "1x", "random", None, None, None, 0), "W", None, [])
    assert not any(a.startswith("--config.weights") for a in random) and "--config.arch=c4" in random


def _record(init, seed, box, pretrain_seed=None):
    metrics = {c: box if c.startswith("bbox") else box / 2 for c in table.COLUMNS}
    return dict(detector="fpn", schedule="1x", init=init, pretrain_seed=pretrain_seed, seed=seed, metrics=metrics)


def test_paired_differences_and_their_standard_errors():
    random = [_record("random", s, b) for s, b in enumerate([0.10, 0.12, 0.11])]
    moco = [_record("mocov2", s, b, 0) for s, b in enumerate([0.13, 0.14, 0.15])]
    insloc = [_record("insloc_fpn", s, b, 0) for s, b in enumerate([0.16, 0.15, 0.19])]
    rows = {r["init"]: r for r in table.table(random + moco + insloc)}
    d = np.array([0.16, 0.15, 0.19]) - np.array([0.10, 0.12, 0.11])  # per fine-tuning seed
    mean, se, count = rows["insloc_fpn"]["vs_random"]["bbox/AP"]
    assert (mean, se, count) == (pytest.approx(d.mean()), pytest.approx(d.std(ddof=1) / np.sqrt(3)), 3)
    d = np.array([0.16, 0.15, 0.19]) - np.array([0.13, 0.14, 0.15])
    assert rows["insloc_fpn"]["vs_mocov2"]["segm/AP"][0] == pytest.approx(d.mean() / 2)
    assert rows["random"]["bbox/AP"] == pytest.approx(0.11) and "vs_random" not in rows["random"]
    assert "vs_mocov2" not in rows["mocov2"]
    text = table.markdown(table.table(random + moco + insloc))
    assert "| fpn | 1x | insloc_fpn | 3 | 16.7 |" in text and "+5.7 ± 1.5 (3)" in text


def test_a_finished_run_is_skipped_and_the_table_written(tmp_path, monkeypatch, capsys):
    for seed in (0, 1):
        workdir = tmp_path / "ft" / f"fpn/1x/random_s{seed}"
        workdir.mkdir(parents=True)
        metrics = {c: 0.1 + seed / 100 for c in table.COLUMNS}
        (workdir / "metrics.json").write_text(json.dumps({"iteration": 2000, **metrics}))
    ran = []
    monkeypatch.setattr(table.subprocess, "run", lambda *a, **k: ran.append(a))
    out = tmp_path / "table.json"
    table.main(["--pretrain", f"0={tmp_path}/pre", "--detectors", "fpn", "--seeds", "0,1", "--workdir",
                str(tmp_path / "ft"), "--out", str(out), "--dry_run"])
    printed = capsys.readouterr().out
    assert "random_s0" not in printed and "mocov2_p0_s0" in printed  # done runs are not started again
    assert os.path.join(str(tmp_path), "pre", "mocov2", "export", "fpn.torchvision_detection.pth") in printed
    assert not ran and not out.exists()  # a dry run starts and writes nothing
    assert "| fpn | 1x | random | 2 | 10.5 |" in printed
