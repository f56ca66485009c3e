"""The seed-summary and box-probe-level scripts' own logic, on constructed inputs (their probes are eval's)."""
import json

import numpy as np
import pytest
from script_loader import load_script


def _write(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return str(path)


def _seeds(tmp_path):
    """Two seeds; seed 1's InsLoc-C4 comes from a separate one-method file."""
    seed0 = {"mocov2": {"0": {"box_iou_after": 0.66}, "10": {"box_iou_after": 0.70, "knn_top1": 0.2}},
             "insloc_c4": {"0": {"box_iou_after": 0.65}, "10": {"box_iou_after": 0.68, "knn_top1": 0.1}}}
    seed1 = {"mocov2": {"0": {"box_iou_after": 0.66}, "10": {"box_iou_after": 0.71}}}
    seed1_c4 = {"method": "insloc_c4", "seed": 1, "command": "x",
                "steps": {"0": {"box_iou_after": 0.64}, "10": {"box_iou_after": 0.69}}}
    return [f"0={_write(tmp_path / 'a.json', seed0)}", f"1={_write(tmp_path / 'b.json', seed1)}",
            f"1={_write(tmp_path / 'c.json', seed1_c4)}"]


def test_seed_differences_merge_both_layouts_and_pair_within_each_seed(tmp_path):
    script = load_script("probe_seeds")
    seeds = script.load_seeds(_seeds(tmp_path))
    assert sorted(seeds[1]) == ["insloc_c4", "mocov2"]
    box = script.seed_differences(seeds, "insloc_c4", "mocov2", "box_iou_after", 10)
    assert box == pytest.approx({0: -0.02, 1: -0.02})
    assert script.seed_differences(seeds, "insloc_c4", "random", "box_iou_after", 10) == pytest.approx(
        {0: 0.03, 1: 0.05})
    # kNN only on seed 0: a seed that lacks the metric on either side is left out, not counted as zero.
    assert script.seed_differences(seeds, "insloc_c4", "mocov2", "knn_top1", 10) == pytest.approx({0: -0.1})


def test_mean_and_se_is_the_sample_standard_error_and_the_table_shows_it(tmp_path):
    script = load_script("probe_seeds")
    values = [0.03, 0.05, 0.10]
    mean, se = script.mean_and_se(values)
    assert mean == pytest.approx(0.06)
    # deviations -0.03, -0.01, 0.04: sample variance 0.0026 / 2 = 0.0013, SE sqrt(0.0013 / 3).
    assert se == pytest.approx(np.sqrt(0.0013 / 3))
    assert np.isnan(script.mean_and_se([0.1])[1])
    rows = script.table(script.load_seeds(_seeds(tmp_path)), "random", 10).splitlines()
    assert rows[0] == "| step 10, minus its random init | metric | seed 0 | seed 1 | mean ± SE over seeds |"
    # C4 box: +0.03, +0.05 -> mean 0.04, SE = sd 0.01414 / sqrt 2 = 0.01.
    assert rows[2] == "| InsLoc-C4 | box_iou_after | +0.030 | +0.050 | +0.040 ± 0.0100 (2) |"
    assert rows[3] == "| MoCo-v2 | box_iou_after | +0.040 | +0.050 | +0.045 ± 0.0050 (2) |"
    assert len(rows) == 4  # no kNN row: no run has kNN at step 0


def test_a_method_given_twice_for_one_seed_is_refused(tmp_path):
    script = load_script("probe_seeds")
    runs = _seeds(tmp_path)
    with pytest.raises(SystemExit, match="seed 0 has mocov2 twice"):
        script.load_seeds(runs + [runs[0]])
    with pytest.raises(SystemExit, match="is not SEED=FILE"):
        script.load_seeds(["docs/probes.json"])


def test_box_probe_grid_specs_parse_and_bad_ones_are_refused():
    script = load_script("box_probe_levels")
    assert script.parse_grid("res4:4+res5:2") == (("res4", 4), ("res5", 2))
    assert script.parse_grid("p3:4") == (("p3", 4),)
    for bad in ("res6:4", "res4", "res4:0", "p5:x", "c4:2"):
        with pytest.raises(SystemExit, match="is not NAME:SIDE"):
            script.parse_grid(bad)


def test_rejittered_boxes_redraw_the_probe_data_layout_at_the_new_strength():
    from configs import tiny
    from insloc_jax.eval import data as probe_data, probes

    script = load_script("box_probe_levels")
    config = tiny.get_config()
    settings = probe_data.Settings.from_config(config)
    data = probe_data.load_probe_data(config, settings)
    canvas = config.data.canvas_size
    # The probes' own strength redraws exactly the boxes load_probe_data drew: same seed, same order.
    same = script.rejitter(data, settings, canvas, 0.25, 1.5)
    np.testing.assert_array_equal(same.jittered, data.jittered)
    # No shift and no scaling: every starting box is its composite's true box.
    exact = script.rejitter(data, settings, canvas, 0.0, 1.0)
    np.testing.assert_allclose(exact.jittered, np.broadcast_to(data.boxes[:, :, None], data.jittered.shape))
    strong = script.rejitter(data, settings, canvas, 0.5, 2.0)
    start = lambda d: probes.paired_iou(  # noqa: E731
        np.broadcast_to(d.boxes[:, :, None], d.jittered.shape).reshape(-1, 4), d.jittered.reshape(-1, 4)).mean()
    assert start(strong) < start(data) < 0.99
    with pytest.raises(SystemExit, match="is not SHIFT,MAX_SCALE"):
        script.parse_jitter("0.25")
    with pytest.raises(SystemExit, match="MAX_SCALE >= 1"):
        script.parse_jitter("0.25,0.5")
