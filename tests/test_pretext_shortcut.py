"""scripts/pretext_shortcut.py: its statistics on constructed embeddings, and the command on a saved state."""
import os
import subprocess
import sys

import numpy as np
import pytest
from script_loader import ROOT, load_script
from xla_flags import flags as xla_test_flags


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_orthogonal_instances_are_told_apart_from_fresh_and_queued_keys():
    script = load_script("pretext_shortcut")
    q = np.eye(2)
    stats = script.shortcut_stats(q, q.copy(), np.array([[-1.0, 0.0]]))
    assert stats == pytest.approx({"positive": 1.0, "fresh_negative": 0.0, "queue_negative": -0.5,
                                   "query_spread": 0.0, "top1_vs_queue": 1.0, "top1_vs_fresh": 1.0})


def test_a_shared_fresh_direction_without_instance_content_is_flagged():
    # Fresh queries and keys share one direction c and are otherwise unrelated; the queue lacks c.
    script = load_script("pretext_shortcut")
    rng = np.random.default_rng(0)
    n, c = 64, np.array([0.0, 0.0, 0.0, 1.0])
    queries = _unit(c + 0.2 * np.pad(rng.normal(size=(n, 3)), ((0, 0), (0, 1))))
    keys = _unit(c + 0.2 * np.pad(rng.normal(size=(n, 3)), ((0, 0), (0, 1))))
    queue = _unit(np.pad(rng.normal(size=(256, 3)), ((0, 0), (0, 1))))
    stats = script.shortcut_stats(queries, keys, queue)
    assert stats["top1_vs_queue"] == 1.0  # the training log's top-1 looks perfect
    assert stats["top1_vs_fresh"] < 0.15  # chance among fresh keys is 1 / 64
    assert stats["fresh_negative"] > stats["queue_negative"] + 0.5
    assert stats["query_spread"] > 0.8


def test_command_reports_every_level_of_a_saved_state(tmp_path):
    from configs import tiny
    from insloc_jax.checkpoint import Checkpointer
    from insloc_jax.state import initial_state

    config = tiny.get_config()
    config.data.source.data_dir = str(tmp_path / "data")
    workdir = tmp_path / "run"
    os.makedirs(workdir)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    checkpointer = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    checkpointer.save(0, initial_state(config))
    checkpointer.close()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "pretext_shortcut.py"),
                           "--workdir", str(workdir), "--num", "16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, XLA_FLAGS=xla_test_flags()))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4  # InsLoc-FPN: one row per level
    values = np.array([[float(v) for v in row.strip("| ").split(" | ")[1:]] for row in rows])
    # At step 0 the queue holds random unit vectors, independent of every query: their mean cosine with the
    # queries is 0 give or take sqrt(spread / (K * D)) = 0.02 (K = 64, D = 16). One network's outputs share a
    # direction (the spread column, about 0.4 here), so positives and fresh negatives sit well above it.
    assert np.all(np.abs(values[:, 2]) < 0.15), values
    assert np.all(values[:, :2] > values[:, 2:3] + 0.15), values
    assert np.all((values[:, 4:] >= 0) & (values[:, 4:] <= 1))
