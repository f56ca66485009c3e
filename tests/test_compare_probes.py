"""The probe-comparison script's table and plot, on constructed results (its training is train.train's)."""
from script_loader import load_script


def _point(retrieval, knn, after):
    return {"retrieval_top1": retrieval, "retrieval_chance": 0.002, "knn_top1": knn, "box_iou_before": 0.617,
            "box_iou_after": after, "box_iou_geometry": 0.669}


def test_table_has_the_random_and_last_point_of_every_method_and_the_plot_is_written(tmp_path):
    script = load_script("compare_probes")
    results = {"insloc_fpn": {0: _point(0.02, 0.131, 0.662), 300: _point(0.05, 0.14, 0.65),
                              900: _point(0.064, 0.143, 0.658)},
               "mocov2": {0: _point(0.02, 0.131, 0.662), 900: {"retrieval_top1": 0.027}}}
    rows = script.table(results).splitlines()
    assert rows[0] == ("| model | step | retrieval top-1 | kNN top-1 | box IoU before | box IoU after | "
                       "box IoU, coordinates only |")
    assert rows[2] == "| InsLoc-FPN (random init) | 0 | 0.020 | 0.131 | 0.617 | 0.662 | 0.669 |"
    assert rows[3] == "| InsLoc-FPN (pretrained) | 900 | 0.064 | 0.143 | 0.617 | 0.658 | 0.669 |"
    assert rows[5] == "| MoCo-v2 (pretrained) | 900 | 0.027 | - | - | - | - |"  # metrics it lacks
    assert len(rows) == 6
    png = str(tmp_path / "probes.png")
    script.plot(results, png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
