"""The probe-comparison script's table and plot, on constructed results (its training is train.train's)."""
import numpy as np
import pytest
from script_loader import load_script


def _point(retrieval, knn, after):
    return {"retrieval_top1": retrieval, "retrieval_chance": 0.002, "knn_top1": knn, "box_iou_before": 0.617,
            "box_iou_after": after, "box_iou_geometry": 0.669}


def test_paired_columns_are_per_item_differences_from_random_and_from_coordinates():
    script = load_script("compare_probes")
    random_items = {"retrieval_top1": np.array([0.0, 1.0, 0.0, 0.0]), "knn_top1": np.array([1.0, 0.0, 0.0]),
                    "box_iou_after": np.array([0.5, 0.6]), "box_iou_geometry": np.array([0.55, 0.65])}
    items = {"retrieval_top1": np.array([1.0, 1.0, 1.0, 0.0]), "knn_top1": np.array([1.0, 1.0, 0.0]),
             "box_iou_after": np.array([0.7, 0.7]), "box_iou_geometry": np.array([0.55, 0.65])}
    columns = script.paired_columns(random_items, items)
    # retrieval d = [1, 0, 1, 0]: mean 0.5, sample sd sqrt(1/3), SE sqrt(1/3) / 2.
    assert columns["retrieval_top1_vs_random"] == pytest.approx(0.5)
    assert columns["retrieval_top1_vs_random_se"] == pytest.approx(np.sqrt(1 / 3) / 2)
    assert columns["knn_top1_vs_random"] == pytest.approx(1 / 3)
    # box d = [0.2, 0.1]; against coordinates d = [0.15, 0.05]: both spread 0.1 / sqrt(2), SE 0.05.
    assert columns["box_iou_after_vs_random"] == pytest.approx(0.15)
    assert columns["box_iou_after_vs_random_se"] == pytest.approx(0.05)
    assert columns["box_iou_after_vs_geometry"] == pytest.approx(0.1)
    assert columns["box_iou_after_vs_geometry_se"] == pytest.approx(0.05)
    without_labels = {k: v for k, v in items.items() if k != "knn_top1"}
    assert "knn_top1_vs_random" not in script.paired_columns(random_items, without_labels)


def test_table_has_the_random_and_last_point_of_every_method_and_the_plot_is_written(tmp_path):
    script = load_script("compare_probes")
    paired = {"retrieval_top1_vs_random": 0.044, "retrieval_top1_vs_random_se": 0.0123,
              "box_iou_after_vs_random": -0.004, "box_iou_after_vs_random_se": 0.002,
              "box_iou_after_vs_geometry": -0.011, "box_iou_after_vs_geometry_se": 0.003}
    results = {"insloc_fpn": {0: _point(0.02, 0.131, 0.662), 300: _point(0.05, 0.14, 0.65),
                              900: {**_point(0.064, 0.143, 0.658), **paired}},
               "mocov2": {0: _point(0.02, 0.131, 0.662), 900: {"retrieval_top1": 0.027}}}
    rows = script.table(results).splitlines()
    assert rows[0] == ("| model | step | retrieval top-1 | kNN top-1 | box IoU before | box IoU after | "
                       "box IoU, coordinates only | box IoU after - coordinates only |")
    assert rows[2] == "| InsLoc-FPN (random init) | 0 | 0.020 | 0.131 | 0.617 | 0.662 | 0.669 | - |"
    assert rows[3] == ("| InsLoc-FPN (pretrained) | 900 | 0.064 (+0.044 ± 0.012) | 0.143 | 0.617 | "
                       "0.658 (-0.004 ± 0.002) | 0.669 | -0.011 ± 0.003 |")
    assert rows[5] == "| MoCo-v2 (pretrained) | 900 | 0.027 | - | - | - | - | - |"  # metrics it lacks
    assert len(rows) == 6
    png = str(tmp_path / "probes.png")
    script.plot(results, png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_ordering_table_pairs_each_method_with_mocov2_on_the_same_items():
    script = load_script("compare_probes")
    moco = {"retrieval_top1": np.array([0.0, 0.0, 1.0, 0.0]), "box_iou_after": np.array([0.6, 0.7])}
    c4 = {"retrieval_top1": np.array([1.0, 0.0, 1.0, 1.0]), "box_iou_after": np.array([0.5, 0.7])}
    rows = script.ordering_table({"insloc_c4": c4, "mocov2": moco}).splitlines()
    assert rows[0] == "| last step minus MoCo-v2 | retrieval_top1 | knn_top1 | box_iou_after |"
    # retrieval d = [1, 0, 0, 1]: mean 0.5, SE sqrt(1/3) / 2 = 0.289; box d = [-0.1, 0]: mean -0.05, SE 0.05.
    assert rows[2] == "| InsLoc-C4 | +0.500 ± 0.289 | - | -0.050 ± 0.050 |"
    assert len(rows) == 3
    assert script.ordering_table({"insloc_c4": c4}) == ""  # no baseline run: no table
