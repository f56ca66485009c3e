"""Training, probes and export run where TensorFlow cannot be imported (as on a plain JAX GPU image).

A directory holding a `tensorflow` package whose import raises goes first on PYTHONPATH of each command.
The training run uses Grain worker processes (spawned: they inherit PYTHONPATH, so they are checked too).
"""
import json
import os
import subprocess
import sys

from xla_flags import flags as xla_test_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env, cwd=ROOT):
    done = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_train_probe_and_export_without_tensorflow(tmp_path):
    blocker = tmp_path / "no_tf" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('TensorFlow is not installed here (test)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), ROOT]), JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_test_flags(2))
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not installed here" in probe.stderr  # the blocker works
    workdir, data = tmp_path / "run", tmp_path / "data"
    _run(["-m", "insloc_jax.train", "--config", "configs/tiny.py", "--workdir", str(workdir),
          f"--config.data.source.data_dir={data}", "--config.train.total_steps=3",
          "--config.data.num_workers=2", "--config.eval.every_steps=3"], env)
    with open(workdir / "eval" / "step_3.json") as f:
        assert json.load(f)["step"] == 3  # the periodic probes ran
    _run(["-m", "insloc_jax.evaluate", "--workdir", str(workdir)], env)
    _run(["-m", "insloc_jax.export", "--workdir", str(workdir), "--format", "torchvision", "--output",
          str(tmp_path / "w.pth")], env)
    assert (tmp_path / "w.pth").stat().st_size > 0
