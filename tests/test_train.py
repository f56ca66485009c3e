"""The training command end to end on the embedded dataset: resume equality, SIGTERM, NaN guard, export.

Runs share one config where they can, so the persistent compilation cache (conftest.py) compiles the tiny
train step once for all of them.
"""
import json
import os
import signal
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from configs import tiny  # noqa: E402
from insloc_jax import export, train  # noqa: E402
from insloc_jax.checkpoint import Checkpointer  # noqa: E402
from insloc_jax.state import initial_state, load_query_variables  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _config(data_dir, **train_overrides):
    c = tiny.get_config()
    c.data.source.data_dir = data_dir
    c.train.update(train_overrides)
    return c


def _restore(workdir, step=None):
    variables, config, step = load_query_variables(workdir, step)
    return variables, step


def _state_at(workdir, config, step):
    """The full TrainState saved at `step` (host arrays)."""
    target = initial_state(config, abstract=True)
    return Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False).restore(target, step)[0]


def test_interrupted_and_resumed_run_equals_a_straight_run(tmp_path, data_dir):
    config = _config(data_dir)
    straight = train.train(config, str(tmp_path / "straight"))
    first = train.train(config, str(tmp_path / "resumed"), stop_at=3)
    assert first["step"] == 3 and first["stopped_by"] == "stop_at"
    second = train.train(config, str(tmp_path / "resumed"))
    assert straight["step"] == second["step"] == 6
    a = _state_at(str(tmp_path / "straight"), config, 6)
    b = _state_at(str(tmp_path / "resumed"), config, 6)
    for name in ("params", "batch_stats", "key_params", "key_batch_stats", "queues", "queue_ptr", "opt_state",
                 "rng", "step"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                                                             atol=1e-6, err_msg=name),
                     getattr(a, name), getattr(b, name))
    assert straight["metrics"]["loss"] == pytest.approx(second["metrics"]["loss"], rel=1e-5)
    for run in ("straight", "resumed"):
        lines = open(tmp_path / run / "metrics.jsonl").read().splitlines()
        assert len(lines) == 6 and '"step": 6' in lines[-1]
        assert (tmp_path / run / "config.json").exists()
        assert os.listdir(tmp_path / run / "tensorboard")


def test_sigterm_saves_a_restorable_checkpoint_and_stops(tmp_path, data_dir, monkeypatch):
    make_batches = train.make_batches

    def batches_then_sigterm(*args, **kwargs):
        for i, batch in enumerate(make_batches(*args, **kwargs)):
            if i == 0:  # the handler is installed before the loop asks for its first batch
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(train, "make_batches", batches_then_sigterm)
    result = train.train(_config(data_dir), str(tmp_path))  # same step as the other tests: compiled once
    assert result["stopped_by"] == "signal" and result["step"] == 1
    variables, step = _restore(str(tmp_path))
    assert step == 1 and "backbone" in variables["params"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    config = _config(data_dir, total_steps=8, checkpoint_every=1, keep_checkpoints=20)
    config.optim.base_lr = 1e12
    with pytest.raises(train.NonFiniteLoss, match="between steps") as info:
        train.train(config, str(tmp_path))
    saved = Checkpointer(str(tmp_path / "checkpoints")).steps()
    assert saved and f"checkpoint is step {saved[-1]}" in str(info.value)
    variables, _ = _restore(str(tmp_path))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(variables))


def test_periodic_probes_during_training_equal_the_probes_of_the_saved_checkpoint(tmp_path, data_dir):
    from insloc_jax import evaluate

    config = _config(data_dir)
    config.eval.every_steps = 2
    workdir = str(tmp_path / "run")
    train.train(config, workdir, stop_at=2)
    with open(os.path.join(workdir, "eval", "step_2.json")) as f:
        during = json.load(f)
    variables, step = _restore(workdir, 2)
    after, _ = evaluate.evaluate(config, variables)
    assert during["step"] == step == 2
    assert {k: v for k, v in during.items() if k not in ("step", "eval_seconds")} == pytest.approx(
        {k: v for k, v in after.items() if k != "eval_seconds"})


def test_export_command_writes_each_format_and_never_clobbers(tmp_path, data_dir):
    workdir = tmp_path / "run"
    train.train(_config(data_dir), str(workdir), stop_at=2)
    for fmt, name in (("torchvision", "tv.pth"), ("mmdet", "mm.pth"), ("detectron2", "d2.pkl")):
        assert export.main(["--workdir", str(workdir), "--format", fmt, "--output", str(tmp_path / name)]) == 0
    before = (tmp_path / "d2.pkl").read_bytes()
    assert export.main(["--workdir", str(workdir), "--format", "detectron2", "--output",
                        str(tmp_path / "d2.pkl")]) == 1
    assert (tmp_path / "d2.pkl").read_bytes() == before
    assert export.main(["--workdir", str(tmp_path / "missing"), "--format", "mmdet", "--output",
                        str(tmp_path / "x.pth")]) == 1
    import pickle

    import torch

    d2 = pickle.load(open(tmp_path / "d2.pkl", "rb"))
    assert d2["matching_heuristics"] is True and "backbone.bottom_up.stem.conv1.weight" in d2["model"]
    assert "state_dict" in torch.load(tmp_path / "mm.pth")
    assert "layer4.1.bn2.running_var" in torch.load(tmp_path / "tv.pth")  # ResNet-18: 2 basic blocks


def test_a_second_run_on_a_busy_workdir_fails_before_writing(tmp_path, data_dir):
    from insloc_jax import workdir_lock

    workdir = tmp_path / "busy"
    workdir.mkdir()
    with workdir_lock.hold(str(workdir)):
        with pytest.raises(workdir_lock.WorkdirBusy, match="in use by another training run"):
            train.train(_config(data_dir), str(workdir))
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_NAME]


def _train_command(workdir, data_dir, *overrides):
    """Runs `python -m insloc_jax.train` on the tiny config with one CPU device; returns the CompletedProcess."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, "-m", "insloc_jax.train", "--config", os.path.join(root, "configs", "tiny.py"),
         "--workdir", str(workdir), f"--config.data.source.data_dir={data_dir}", *overrides],
        cwd=root, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2"))


@pytest.mark.parametrize("flag, message", [
    ("--config.optim.schedule=linear", "error: optim.schedule must be 'cosine' or 'constant', got 'linear'"),
    ("--config.optim.schedulee=cosine", "error: a --config.<field> override names no field of the config: "
                                        "'schedulee' Did you mean \"schedule\" instead of \"schedulee\"?"),
    ("--config=configs/no_such_run.py", "error: cannot load the --config file: [Errno 2] No such file or "
                                        "directory: 'configs/no_such_run.py'"),
])
def test_train_command_rejects_a_bad_config_in_one_line_and_keeps_the_run_record(tmp_path, data_dir, flag,
                                                                                 message):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")  # the record of a run already there
    proc = _train_command(workdir, data_dir, flag)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in proc.stderr
    assert (workdir / "config.json").read_text() == "{}"


def test_compilation_cache_setting_resolves_to_a_directory(monkeypatch, tmp_path):
    updates = {}
    monkeypatch.setattr(train.jax.config, "update", lambda name, value: updates.__setitem__(name, value))
    assert train.use_compilation_cache("", str(tmp_path)) is None
    assert updates == {}
    auto = train.use_compilation_cache("auto", str(tmp_path))
    assert auto == str(tmp_path / "compilation_cache")
    assert updates == {"jax_compilation_cache_dir": auto}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert train.use_compilation_cache("~/xla", "unused") == str(tmp_path / "home" / "xla")


def test_train_command_keeps_the_compiled_step_for_a_resumed_run(tmp_path, data_dir):
    import json

    workdir = tmp_path / "run"
    proc = _train_command(workdir, data_dir, "--config.train.total_steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 1
    # JAX names entries <program>-<key>-cache and writes those that took over a second to compile: the
    # state initialiser and the train step (a jit of `_fun` with jax 0.10) here.
    cached = os.listdir(workdir / "compilation_cache")
    assert any(name.endswith("-cache") for name in cached), cached
