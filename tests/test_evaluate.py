"""Frozen-feature probes: known answers on constructed features, loop references, and one tiny end-to-end run.

The probe functions are checked where the right answer is known without the code under test: identical or
independent features for retrieval, separable clusters or labels unrelated to the features for kNN, a hand-computed vote,
boxes and deltas worked out by hand, ridge against the normal equations and brute-force leave-one-out, and
a box probe on features that encode the offsets linearly (must recover them) or are pure noise (must not
beat the uncorrected boxes).
"""
import json
import os

import jax
import numpy as np
import pytest

from insloc_jax.eval import probes
from xla_flags import flags as xla_test_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_retrieval_identical_scaled_features_is_perfect():
    feats = np.random.default_rng(0).normal(size=(50, 16))
    assert probes.retrieval_top1(feats, 3.0 * feats) == 1.0  # cosine ignores scale


def test_retrieval_of_shifted_pairs_is_zero_and_random_is_chance():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(50, 32))
    assert probes.retrieval_top1(feats, np.roll(feats, 1, axis=0)) == 0.0
    n = 400
    accuracy = probes.retrieval_top1(rng.normal(size=(n, 32)), rng.normal(size=(n, 32)))
    assert accuracy < 5.0 / n  # chance is 1 / n = 0.0025


def test_retrieval_hits_mark_exactly_the_instances_that_find_themselves():
    feats = np.eye(4)
    keys = feats[[0, 2, 1, 3]]  # instances 1 and 2 swapped in view 2
    np.testing.assert_array_equal(probes.retrieval_hits(feats, keys), [True, False, False, True])
    assert probes.retrieval_top1(feats, keys) == 0.5


def test_group_means_average_each_group_in_id_order():
    values = np.array([1.0, 2.0, 10.0, 3.0, 20.0])
    np.testing.assert_allclose(probes.group_means(values, [7, 7, 3, 7, 3]), [15.0, 2.0])


def test_paired_difference_against_the_textbook_formula():
    base = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    other = np.array([0.0, 0.0, 1.0, 0.0, 1.0])
    # d = [-1, 0, 0, -1, 1]: mean -0.2; sample variance ((0.8^2 * 2) + 0.2^2 * 2 + 1.2^2) / 4 = 0.7.
    mean, se = probes.paired_difference(base, other)
    assert mean == pytest.approx(-0.2)
    assert se == pytest.approx(np.sqrt(0.7 / 5))
    # What the items share cancels: a constant shift has no spread, however noisy the items are.
    noisy = np.random.default_rng(0).normal(size=100)
    assert probes.paired_difference(noisy, noisy + 0.05) == pytest.approx((0.05, 0.0), abs=1e-12)
    with pytest.raises(ValueError, match="equally long"):
        probes.paired_difference(base, other[:4])


def test_knn_on_separable_clusters_is_perfect_and_on_unrelated_labels_is_chance():
    rng = np.random.default_rng(2)
    centres = 10.0 * np.eye(4, 32)
    bank_labels, query_labels = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    bank = centres[bank_labels] + rng.normal(size=(400, 32))
    queries = centres[query_labels] + rng.normal(size=(400, 32))
    assert probes.knn_top1(bank, bank_labels, queries, query_labels, 4) == 1.0
    # Labels unrelated to the features: every query's vote is an independent draw, so accuracy is chance.
    bank, queries = rng.normal(size=(1000, 32)), rng.normal(size=(1000, 32))
    shuffled = rng.permutation(bank_labels.repeat(3)[:1000])
    assert abs(probes.knn_top1(bank, shuffled, queries, rng.integers(0, 4, 1000), 4) - 0.25) < 0.06


def test_knn_vote_is_similarity_weighted():
    # Three neighbours: two of class 0 at cosine 0.1, one of class 1 at cosine 0.9.
    query = np.array([[1.0, 0.0]])
    at = lambda c: [c, np.sqrt(1 - c * c)]  # noqa: E731
    bank = np.array([at(0.1), at(0.1), at(0.9), at(-0.9)])
    labels = np.array([0, 0, 1, 1])
    # T = 0.07: exp(0.9 / T) outweighs 2 exp(0.1 / T); a large T turns the vote into a majority vote.
    assert probes.knn_predict(bank, labels, query, 2, k=3, temperature=0.07)[0] == 1
    assert probes.knn_predict(bank, labels, query, 2, k=3, temperature=100.0)[0] == 0


def _loop_knn(bank, labels, queries, num_classes, k, temperature):
    """Reference: one query at a time, sorting python lists."""
    out = []
    for q in queries:
        sims = [float(q @ b / np.linalg.norm(q) / np.linalg.norm(b)) for b in bank]
        order = sorted(range(len(bank)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[labels[j]] += np.exp(sims[j] / temperature)
        out.append(int(np.argmax(votes)))
    return np.array(out)


def test_knn_matches_loop_reference():
    rng = np.random.default_rng(3)
    bank, queries = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    labels = rng.integers(0, 5, 60)
    expected = _loop_knn(bank, labels, queries, 5, 20, 0.07)
    np.testing.assert_array_equal(probes.knn_predict(bank, labels, queries, 5), expected)


def test_box_deltas_by_hand_and_round_trip():
    box = np.array([[0.0, 0.0, 10.0, 10.0]])
    target = np.array([[5.0, 0.0, 15.0, 20.0]])  # centre (10, 10) vs (5, 5); width same, height doubled
    np.testing.assert_allclose(probes.box_deltas(box, target), [[0.5, 0.5, 0.0, np.log(2.0)]])
    rng = np.random.default_rng(4)
    xy = rng.uniform(0, 50, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 40, (20, 2))], axis=1)
    xy = rng.uniform(0, 50, (20, 2))
    targets = np.concatenate([xy, xy + rng.uniform(2, 40, (20, 2))], axis=1)
    np.testing.assert_allclose(probes.apply_deltas(boxes, probes.box_deltas(boxes, targets)), targets,
                               atol=1e-9)


def test_paired_iou_by_hand():
    a = np.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0]])
    b = np.array([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 4.0, 2.0]])
    np.testing.assert_allclose(probes.paired_iou(a, b), [1.0 / 7.0, 0.0, 0.5])


def test_jitter_boxes_is_deterministic_and_stays_on_canvas():
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 30, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(16, 34, (200, 2))], axis=1)
    a, b = probes.jitter_boxes(boxes, 7, 64), probes.jitter_boxes(boxes, 7, 64)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, probes.jitter_boxes(boxes, 8, 64))
    assert a.min() >= 0.0 and a.max() <= 64.0 and np.all(a[:, 2:] - a[:, :2] >= 2.0)
    iou = probes.paired_iou(a, boxes)
    assert 0.3 < iou.mean() < 0.8 and iou.max() < 1.0


def test_ridge_matches_normal_equations_for_a_fixed_strength():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(40, 10)) * rng.uniform(0.5, 3, 10) + 2.0, rng.normal(size=(40, 3))
    model = probes.fit_ridge(x, y, grid=(0.5,))
    xs = (x - x.mean(0)) / x.std(0)
    alpha = 0.5 * len(x)
    weights = np.linalg.solve(xs.T @ xs + alpha * np.eye(10), xs.T @ (y - y.mean(0)))
    np.testing.assert_allclose(model["weights"], weights, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(probes.predict_ridge(model, x), xs @ weights + y.mean(0), atol=1e-9)


def test_ridge_strength_is_the_brute_force_leave_one_out_choice():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(30, 6))
    y = x @ rng.normal(size=(6, 2)) + 2.0 * rng.normal(size=(30, 2))
    xs, grid = (x - x.mean(0)) / x.std(0), (1e-3, 1e-1, 1.0, 10.0)

    def loo_error(a):
        """Refits ridge with an unpenalised intercept on n - 1 rows, for every held-out row."""
        errors = []
        for i in range(len(x)):
            keep = np.arange(len(x)) != i
            xk, yk = xs[keep], y[keep]
            xc = xk - xk.mean(0)
            w = np.linalg.solve(xc.T @ xc + a * len(x) * np.eye(6), xc.T @ (yk - yk.mean(0)))
            prediction = (xs[i] - xk.mean(0)) @ w + yk.mean(0)
            errors.append(np.sum((prediction - y[i]) ** 2))
        return np.mean(errors)

    expected = grid[int(np.argmin([loo_error(a) for a in grid]))] * len(x)
    assert probes.fit_ridge(x, y, grid)["alpha"] == pytest.approx(expected)


def test_ridge_strength_with_groups_is_the_brute_force_leave_group_out_choice():
    rng = np.random.default_rng(12)
    groups = np.repeat(np.arange(12), 3)  # 12 instances, 3 correlated rows each
    x = rng.normal(size=(12, 6))[groups] + 0.3 * rng.normal(size=(36, 6))
    y = x @ rng.normal(size=(6, 2)) + rng.normal(size=(12, 2))[groups] + 0.5 * rng.normal(size=(36, 2))
    xs, grid = (x - x.mean(0)) / x.std(0), (1e-3, 1e-2, 1e-1, 1.0, 10.0)

    def held_out_error(a):
        """Refits ridge with an unpenalised intercept without each group and predicts that group."""
        errors = []
        for g in range(12):
            keep = groups != g
            xk, yk = xs[keep], y[keep]
            xc = xk - xk.mean(0)
            w = np.linalg.solve(xc.T @ xc + a * len(x) * np.eye(6), xc.T @ (yk - yk.mean(0)))
            prediction = (xs[~keep] - xk.mean(0)) @ w + yk.mean(0)
            errors.append(np.sum((prediction - y[~keep]) ** 2, axis=1))
        return np.mean(np.concatenate(errors))

    errors = [held_out_error(a) for a in grid]
    expected = grid[int(np.argmin(errors))] * len(x)
    assert probes.fit_ridge(x, y, grid, groups=groups)["alpha"] == pytest.approx(expected)
    # Leaving single rows out would pick a weaker penalty here: the rows of one instance leak into each other.
    assert probes.fit_ridge(x, y, grid)["alpha"] < expected


def _probe_boxes(n, seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 30, (n, 2))
    true = np.concatenate([xy, xy + rng.uniform(16, 34, (n, 2))], axis=1)
    return true, probes.jitter_boxes(true, seed + 1, 64)


def _box_probe(features, jittered, true_boxes, fit):
    """Mean IoU of the scored rows' jittered boxes, before and after the probe's correction."""
    before, after, _ = probes.box_regression_ious(features, jittered, true_boxes, fit)
    return {"box_iou_before": np.mean(before), "box_iou_after": np.mean(after)}


def test_box_probe_recovers_linearly_encoded_offsets():
    rng = np.random.default_rng(8)
    true, jittered = _probe_boxes(400, 9)
    deltas = probes.box_deltas(jittered, true)
    # Features: an invertible mixing of the deltas, small noise, and 60 irrelevant dimensions.
    feats = np.concatenate([deltas @ rng.normal(size=(4, 20)) + 0.01 * rng.normal(size=(400, 20)),
                            rng.normal(size=(400, 60))], axis=1)
    fit = np.arange(400) < 200
    result = _box_probe(feats, jittered, true, fit)
    assert result["box_iou_after"] > 0.95
    assert result["box_iou_after"] > result["box_iou_before"] + 0.2
    np.testing.assert_allclose(result["box_iou_before"], probes.paired_iou(jittered[~fit], true[~fit]).mean())


def test_box_probe_on_noise_features_does_not_beat_the_jittered_boxes():
    true, jittered = _probe_boxes(400, 10)
    feats = np.random.default_rng(11).normal(size=(400, 80))
    result = _box_probe(feats, jittered, true, np.arange(400) < 200)
    assert result["box_iou_after"] < result["box_iou_before"] + 0.02


def test_box_geometry_by_hand():
    geometry = probes.box_geometry(np.array([[10.0, 20.0, 50.0, 80.0]]), 100)
    np.testing.assert_allclose(geometry, [[0.1, 0.2, 0.5, 0.8, 0.4, 0.6]])


def test_box_geometry_probe_learns_a_layout_prior_and_nothing_else():
    # Every true box is the same: where the jittered box is says where the true box is, with no image.
    true = np.tile([[20.0, 30.0, 70.0, 90.0]], (400, 1))
    jittered = probes.jitter_boxes(true, 12, 100)
    fit = np.arange(400) < 200
    layout = _box_probe(probes.box_geometry(jittered, 100), jittered, true, fit)
    assert layout["box_iou_after"] > layout["box_iou_before"] + 0.25
    # Boxes placed independently of each other leave the layout prior next to nothing to learn.
    scattered, jittered = _probe_boxes(400, 13)
    layout = _box_probe(probes.box_geometry(jittered, 64), jittered, scattered, fit)
    assert layout["box_iou_after"] < layout["box_iou_before"] + 0.05


def test_evaluate_end_to_end_on_the_tiny_embedded_dataset(tmp_path):
    from configs import tiny
    from insloc_jax import config as config_lib
    from insloc_jax.eval import run as evaluate
    from insloc_jax.models.encoder import Encoder

    config = tiny.get_config()
    config.data.source.data_dir = str(tmp_path / "data")
    # Backbone-only variables keep the test fast; the probes never touch the head.
    images = np.zeros((1, config.data.canvas_size, config.data.canvas_size, 3), np.float32)
    variables = jax.jit(lambda: config_lib.make_encoder(config).init(
        jax.random.PRNGKey(0), images, method=Encoder.features))()
    metrics, items = evaluate.evaluate(config, variables)
    expected = {"retrieval_top1", "retrieval_chance", "knn_top1", "box_iou_before", "box_iou_after",
                "box_iou_gain", "box_ridge_alpha", "box_iou_geometry", "eval_seconds"}
    assert set(metrics) == expected
    num_test = config.data.source.num_test
    assert metrics["retrieval_chance"] == pytest.approx(1.0 / num_test)
    for name in ("retrieval_top1", "knn_top1", "box_iou_before", "box_iou_after", "box_iou_geometry"):
        assert 0.0 <= metrics[name] <= 1.0, name
    # Accuracies are multiples of 1 / (number of queries).
    assert metrics["retrieval_top1"] * num_test == pytest.approx(round(metrics["retrieval_top1"] * num_test))
    assert 0.2 < metrics["box_iou_before"] < 0.9
    assert metrics["box_iou_gain"] == pytest.approx(metrics["box_iou_after"] - metrics["box_iou_before"])
    # Per-item scores: one per query or scored instance, and the metrics are their means.
    fitted = int(round(evaluate.Settings.from_config(config).fit_fraction * num_test))
    assert {k: v.shape for k, v in items.items()} == {
        "retrieval_top1": (num_test,), "knn_top1": (num_test,), "box_iou_before": (num_test - fitted,),
        "box_iou_after": (num_test - fitted,), "box_iou_geometry": (num_test - fitted,)}
    for name, scores in items.items():
        assert metrics[name] == pytest.approx(scores.mean()), name

    # The periodic evaluator rebuilds the same probe data from the seed and writes what it returns.
    workdir = str(tmp_path / "run")
    again = evaluate.make_periodic_evaluator(config, workdir)(3, variables)
    assert {k: v for k, v in again.items() if k != "eval_seconds"} == pytest.approx(
        {k: v for k, v in metrics.items() if k != "eval_seconds"})
    with open(os.path.join(workdir, "eval", "step_3.json")) as f:
        assert json.load(f) == {"step": 3, **again}
    with np.load(os.path.join(workdir, "eval", "step_3.npz")) as saved:
        assert set(saved.files) == set(items)
        for name in items:
            np.testing.assert_allclose(saved[name], items[name], err_msg=name)
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_box_probe_features_of_several_jitters_are_each_box_alone():
    from configs import tiny
    from insloc_jax import config as config_lib
    from insloc_jax.eval import features
    from insloc_jax.models.encoder import Encoder

    config = tiny.get_config()
    size = config.data.canvas_size
    encoder = config_lib.make_encoder(config)
    images = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)
    variables = encoder.init(jax.random.PRNGKey(0), images, method=Encoder.features)
    true = np.array([[4, 6, 40, 50], [10, 2, 60, 30], [0, 0, size, size]], np.float32)
    jittered = np.stack([probes.jitter_boxes(true, seed, size) for seed in (1, 2)], axis=1).astype(np.float32)
    composite_fn, _ = features.make_extractors(encoder)
    both = composite_fn(variables, images, true, jittered)["regress"]  # [3, 2, D]
    assert both.shape[:2] == (3, 2)
    for j in range(2):
        alone = composite_fn(variables, images, true, jittered[:, j:j + 1])["regress"][:, 0]
        np.testing.assert_allclose(both[:, j], alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(both[:, 0], both[:, 1])  # the two jitters really see different windows


def test_probe_settings_reject_zero_jitters():
    from insloc_jax import config as config_lib
    from insloc_jax.eval.data import Settings

    with pytest.raises(config_lib.ConfigError, match="eval.jitters=0"):
        Settings(jitters=0)
    assert Settings(jitters=1).jitters == 1


def _evaluate_command(*args):
    """Runs `python -m insloc_jax.evaluate ARGS` with one CPU device; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "insloc_jax.evaluate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, XLA_FLAGS=xla_test_flags()))


def test_evaluate_command_on_the_random_init_writes_what_it_prints(tmp_path):
    workdir = tmp_path / "run"
    proc = _evaluate_command("--workdir", str(workdir), "--random", "--config",
                             os.path.join(ROOT, "configs", "tiny.py"), f"--config.data.source.data_dir={tmp_path}/data")
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(workdir / "eval" / "step_0.json") as f:
        written = json.load(f)
    assert printed["written"] == str(workdir / "eval" / "step_0.json")
    assert written == {k: v for k, v in printed.items() if k != "written"}
    with np.load(workdir / "eval" / "step_0.npz") as items:
        for name in ("retrieval_top1", "knn_top1", "box_iou_after"):
            assert written[name] == pytest.approx(items[name].mean()), name


def test_evaluate_command_reports_a_missing_config_file_in_one_line(tmp_path):
    proc = _evaluate_command("--workdir", str(tmp_path), "--random", "--config", "configs/no_such_run.py")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("error: cannot load the --config file: [Errno 2] No such "
                                                    "file or directory: 'configs/no_such_run.py'")
    assert "Traceback" not in proc.stderr


def test_box_probe_grids_pool_the_named_maps_backbone_and_fpn():
    """A grid on p3 and res2 pools those maps (checked against the numpy RoIAlign of the encoder's own
    outputs) around the enlarged jittered box, in grid order; FPN levels of a MoCo encoder are refused."""
    from configs import tiny
    from insloc_jax import config as config_lib
    from insloc_jax.eval import features
    from insloc_jax.models.encoder import Encoder
    from insloc_jax.state import init_variables
    from roi_align_reference import roi_align_numpy

    config = tiny.get_config()
    size = config.data.canvas_size
    encoder = config_lib.make_encoder(config)
    images = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
    variables = init_variables(encoder, jax.random.PRNGKey(0), size)
    true = np.array([[4, 6, 40, 50], [10, 2, 60, 30]], np.float32)
    jittered = probes.jitter_boxes(true, 3, size)[:, None].astype(np.float32)  # [2, 1, 4]
    grids = (("p3", 2), ("res2", 3))
    regress = np.asarray(features.make_extractors(encoder, grids)[0](variables, images, true, jittered)["regress"])
    maps = dict(encoder.apply(variables, images, method=Encoder.features))
    maps.update(encoder.apply(variables, images, method=Encoder.pyramid))
    window = np.asarray(features.context_boxes(jittered[:, 0], size))
    expected = [roi_align_numpy(np.asarray(maps[name], np.float32), window, np.arange(2), (side, side),
                                maps[name].shape[1] / size, 0, True).reshape(2, -1) for name, side in grids]
    np.testing.assert_allclose(regress[:, 0], np.concatenate(expected, axis=1), rtol=1e-4, atol=1e-5)
    config.model.arch = "moco"
    with pytest.raises(ValueError, match="FPN levels"):
        features.make_extractors(config_lib.make_encoder(config), grids)
