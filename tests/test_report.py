"""The end-of-run report: phase times, probes against random initialisation, the verdict, the outputs."""
import json
import os
import pickle
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import tiny  # noqa: E402
from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax import report, train  # noqa: E402
from insloc_jax.state import initial_state, query_variables  # noqa: E402


def _row(name, gain, se, random=0.1):
    return {"name": name, "label": name, "random": random, "final": random + gain, "gain": gain, "se": se}


@pytest.mark.parametrize("rows, expected", [
    ([_row("retrieval", 0.05, 0.01), _row("knn", 0.0, 0.01)], "learned: retrieval +0.050 ± 0.010 (+5.0"),
    ([_row("retrieval", 0.02, 0.01), _row("knn", -0.01, 0.01)], "did not learn: no probe beats random"),
    ([_row("retrieval", 0.05, 0.01), _row("knn", -0.05, 0.01)], "did not learn: knn -0.050 ± 0.010 (-5.0"),
    ([_row("retrieval", 0.0, 0.0), _row("knn", 0.0, 0.0)], "did not learn: no probe beats random"),
    ([_row("retrieval", 0.01, 0.0)], "learned: retrieval +0.010 ± 0.000 (+inf"),
    ([], "no verdict"),
])
def test_the_verdict_needs_a_gain_of_three_standard_errors_and_no_such_loss(rows, expected):
    assert report.verdict(rows).startswith(expected)


def test_the_loss_curve_draws_the_last_record_of_each_step(tmp_path, monkeypatch):
    records = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}, {"step": 2, "loss": 2.5},
               {"step": 3, "loss": 2.0}, {"step": 3, "error": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from matplotlib.axes import Axes

    drawn = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *a, **k: drawn.append((list(x), list(y))) or
                        plot(self, x, y, *a, **k))
    path = report.loss_curve(str(tmp_path))
    assert drawn == [([1, 2, 3], [4.0, 2.5, 2.0])]
    assert path == str(tmp_path / "loss.png") and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert report.loss_curve(str(tmp_path / "nowhere")) is None


def test_batch_statistics_are_re_estimated_from_the_initial_ones_so_equal_weights_agree():
    config = tiny.get_config()
    encoder = config_lib.make_encoder(config)
    variables = query_variables(initial_state(config))
    moved = jax.tree.map(lambda x: x + 3.0, variables["batch_stats"])  # as after training at lr 0
    images = np.random.default_rng(0).standard_normal((40, 64, 64, 3)).astype(np.float32)
    update = report.stats_updater(encoder)
    a = report.recalibrated(update, variables, images, batch_size=16)
    b = report.recalibrated(update, dict(variables, batch_stats=moved), images, batch_size=16)
    jax.tree.map(np.testing.assert_array_equal, a["batch_stats"], b["batch_stats"])
    # Two batches were used (40 images, batch 16, the partial third dropped): the backbone's means moved.
    means = [x for path, x in jax.tree_util.tree_flatten_with_path(a["batch_stats"])[0] if path[-1].key == "mean"]
    assert any(np.any(np.asarray(m) != 0) for m in means)


def test_a_run_at_learning_rate_0_reports_it_did_not_learn_and_exports(tmp_path):
    config = tiny.get_config()
    config.data.source.data_dir = str(tmp_path / "data")
    config.optim.base_lr = 0.0
    config.train.update(report=True, export_format="detectron2")
    config.eval.update(report_num_test=16, report_num_bank=32, batch_size=16)
    result = train.train(config, str(tmp_path / "run"))
    text = result["report"]
    assert "did not learn: no probe beats random initialisation by 3 standard errors" in text
    # Identical weights, re-estimated statistics: every probe item scores alike, gain exactly 0.
    assert "+0.000 ± 0.000" in text
    for phase in ("dataset", "setup", "compile", "train", "probe", "export", "total"):
        assert any(line.split()[:1] == [phase] for line in text.splitlines()), phase
    exported = tmp_path / "run" / "export" / "step_6.detectron2.pkl"
    assert result["export"] == str(exported)
    assert "backbone.bottom_up.stem.conv1.weight" in pickle.load(open(exported, "rb"))["model"]
    assert str(tmp_path / "run" / "loss.png") in text and (tmp_path / "run" / "loss.png").exists()
    before = exported.read_bytes()
    assert train.export_at_end("detectron2", str(tmp_path / "run"), 6) == str(exported)  # a rerun keeps it
    assert exported.read_bytes() == before


def test_a_folder_source_gets_no_verdict_instead_of_failing_after_training(tmp_path):
    config = tiny.get_config()
    config.data.source.update(kind="folder", root=str(tmp_path))
    assert train._report_probes(config, str(tmp_path)) == (
        [], "no verdict: a folder or file-list source has no held-out split to probe")
