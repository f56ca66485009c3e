"""The training command on the embedded dataset: periodic probes, export, a busy workdir, bad flags.

Resuming (exactly, after SIGTERM, kill -9, corrupt checkpoints or a non-finite loss) and the persistent
compilation cache are tested through the command in test_recovery.py.

Runs share one config where they can, so the persistent compilation cache (conftest.py) compiles the tiny
train step once for all of them.
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from configs import tiny  # noqa: E402
from insloc_jax import export, train  # noqa: E402
from insloc_jax.state import load_query_variables  # noqa: E402
from xla_flags import flags as xla_test_flags  # noqa: E402


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


def test_periodic_probes_during_training_equal_the_probes_of_the_saved_checkpoint(tmp_path, data_dir):
    from insloc_jax.eval import run as evaluate

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
    for fmt, name in (("torchvision", "tv.pth"), ("mmdet", "mm.pth"), ("detectron2", "d2.pkl"),
                      ("torchvision_detection", "tvd.pth")):
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
    detection = torch.load(tmp_path / "tvd.pth")  # the tiny run is InsLoc-FPN: backbone, FPN and box head
    assert {"backbone.body.layer4.1.bn2.running_var", "backbone.fpn.inner_blocks.0.1.weight",
            "roi_heads.box_head.5.weight"} <= set(detection)


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
        env=dict(os.environ, XLA_FLAGS=xla_test_flags()))


@pytest.mark.parametrize("flag, message", [
    ("--config.optim.schedule=linear", "error: optim.schedule must be 'cosine' or 'constant', got 'linear'"),
    ("--config.optim.schedulee=cosine", "error: a --config.<field> override names no field of the config: "
                                        "'schedulee' Did you mean \"schedule\" instead of \"schedulee\"?"),
    ("--config.train.export_format=onnx", "error: train.export_format must be one of ('torchvision', 'mmdet', "
                                          "'detectron2', 'torchvision_detection') or '' (no export), got 'onnx'"),
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
