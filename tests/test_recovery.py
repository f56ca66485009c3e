"""Faults met through the training command, as a user meets them, each ending in the exact weights of a
straight run.

One straight CLI run of the tiny config to step 12 (checkpoints every 3 steps) is the reference. Each fault
starts from a copy of its workdir cut back to an earlier step, is struck (corrupt files, kill -9 while an
async save is being committed, SIGTERM mid-run, a NaN loss), and the same command is rerun:
every tensor of the resumed run's step 12 must equal the reference's. Independent commands run side by
side, and all read the reference's compilation cache, so the train step compiles once.
"""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402
from insloc_jax.checkpoint import Checkpointer  # noqa: E402
from insloc_jax.state import initial_state  # noqa: E402
from xla_flags import flags as xla_test_flags  # noqa: E402

STEPS, EVERY = 12, 3


class Run:
    """One training command in the background; its output goes to files beside the workdir."""

    def __init__(self, workdir, env, *overrides, fault=None):
        self.workdir, self.marker = str(workdir), str(workdir) + ".marker"
        if os.path.exists(self.marker):  # left by the previous command on this workdir
            os.remove(self.marker)
        entry = ([os.path.join(ROOT, "tests", "fault_launcher.py")] if fault
                 else ["-m", "insloc_jax.train"])
        command = [sys.executable, *entry, "--config", os.path.join(ROOT, "configs", "tiny.py"),
                   "--workdir", self.workdir, f"--config.data.source.data_dir={env['data']}",
                   f"--config.train.total_steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
                   "--config.train.keep_checkpoints=10", f"--config.train.compilation_cache={env['cache']}",
                   *overrides]
        extra = dict(INSLOC_FAULT=fault, INSLOC_FAULT_MARKER=self.marker) if fault else {}
        self._out = open(self.workdir + ".stdout", "w+")
        self._err = open(self.workdir + ".stderr", "w+")
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self._out, stderr=self._err, env=dict(
            os.environ, XLA_FLAGS=xla_test_flags(), **extra))

    def wait_for_marker(self, timeout=240):
        """Blocks until the fault hook has fired (the process is then held still)."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.marker):
            assert self.proc.poll() is None, f"exited with {self.proc.returncode} first:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, "the fault hook never fired"
            time.sleep(0.05)

    def finish(self, timeout=300):
        """(exit status, stdout, stderr) once the process has ended."""
        rc = self.proc.wait(timeout)
        self._out.close()
        self._err.close()
        return rc, _read(self.workdir + ".stdout"), self.stderr()

    def stderr(self):
        return _read(self.workdir + ".stderr")


def _read(path):
    with open(path) as f:
        return f.read()


def _finished(run):
    rc, out, err = run.finish()
    assert rc == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("recovery")
    # The reference keeps its compiled programs in <workdir>/compilation_cache (the default); every later
    # command reads them from there.
    env = {"data": str(base / "data"), "cache": "auto", "base": base, "reference": str(base / "reference")}
    env["result"], _ = _finished(Run(env["reference"], env))
    env["cache"] = os.path.join(env["reference"], "compilation_cache")
    return env


def test_a_straight_run_writes_its_record_metrics_and_compiled_programs(env):
    assert env["result"]["step"] == STEPS and env["result"]["stopped_by"] is None
    reference = env["reference"]
    lines = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert lines[-1]["loss"] == pytest.approx(env["result"]["metrics"]["loss"])
    assert json.load(open(os.path.join(reference, "config.json")))["train"]["total_steps"] == STEPS
    assert os.listdir(os.path.join(reference, "tensorboard"))
    assert _checkpoints(reference) == ["12", "3", "6", "9"]
    # JAX names entries <program>-<key>-cache and writes those that took over a second to compile: the
    # state initialiser and the train step (a jit of `_fun` with jax 0.10) here.
    cached = os.listdir(env["cache"])
    assert sum(name.endswith("-cache") for name in cached) >= 2, cached


def _copy_at(env, name, step):
    """A copy of the reference workdir as it was when step `step` had just been checkpointed."""
    workdir = os.path.join(env["base"], name)
    shutil.copytree(env["reference"], workdir, ignore=shutil.ignore_patterns("compilation_cache"))
    for later in range(step + EVERY, STEPS + 1, EVERY):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(later)))
    return workdir


def _state(workdir, step=STEPS):
    config = tiny.get_config()
    target = initial_state(config, abstract=True)
    return Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False).restore(target, step)[0]


def _assert_equals_reference(env, workdir):
    """Every tensor of step 12 (weights, BN statistics, key encoder, queues, optimiser, RNG) is equal."""
    expected = jax.tree_util.tree_flatten_with_path(_state(env["reference"]))[0]
    actual = jax.tree.leaves(_state(workdir))
    assert len(actual) == len(expected)
    for (path, want), got in zip(expected, actual):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def _data_files(workdir, step):
    """The step's array data files, largest first."""
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "default", "**", "d", "*"), recursive=True)
    return sorted(files, key=os.path.getsize, reverse=True)


def _random_bytes(workdir, step):
    rng = np.random.default_rng(step)
    for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(rng.bytes(max(os.path.getsize(path), 64)))


def _truncate(workdir, step):
    path = _data_files(workdir, step)[0]
    os.truncate(path, os.path.getsize(path) // 2)


def _remove(workdir, step):
    os.remove(_data_files(workdir, step)[0])


def _empty(workdir, step):
    os.truncate(_data_files(workdir, step)[0], 0)


def _moved_aside(workdir, step):
    return glob.glob(os.path.join(workdir, "checkpoints", f"{step}.unreadable-*"))


def _checkpoints(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.fixture(scope="module")
def runs(env):
    """Every fault of this module, struck and resumed; {stage: what its test checks}.

    Three workdirs, side by side. "chain" starts from the reference cut back to step 6 and meets one fault
    per command: kill -9 while step 9 is being committed, SIGTERM after step 10 (it stops at 11), then
    random bytes over step 11 and a truncated file in step 9, after which the plain command must finish
    exactly like the reference. "files" starts at step 9 with a file of step 9 missing and one of step 6
    emptied, and must resume from step 3. "non_finite" starts at step 6 and meets NaN colour-jitter factors
    in the batch of step 8.
    """
    out = {}
    files = _copy_at(env, "files", 9)
    _remove(files, 9)
    _empty(files, 6)
    files_run = Run(files, env)
    non_finite = _copy_at(env, "non_finite", 6)
    before = _digest(os.path.join(non_finite, "checkpoints"))
    non_finite_run = Run(non_finite, env, fault="nan_at_step:8")
    chain = _copy_at(env, "chain", 6)

    killed = Run(chain, env, fault="hang_in_commit")
    killed.wait_for_marker()  # step 9's save is being committed, in Orbax's background thread
    os.kill(killed.proc.pid, signal.SIGKILL)
    out["kill_9"] = {"rc": killed.finish()[0], "left": _checkpoints(chain)}

    stopped = Run(chain, env, fault="pause_at_step:10")
    stopped.wait_for_marker()  # step 10 is done; the loop sees the signal after step 11
    os.kill(stopped.proc.pid, signal.SIGTERM)
    os.remove(stopped.marker)  # lets the paused step go on
    rc, stdout, stderr = stopped.finish()
    out["sigterm"] = {"rc": rc, "stderr": stderr, "left": _checkpoints(chain),
                      "result": json.loads(stdout.strip().splitlines()[-1]) if rc == 0 else None}

    _random_bytes(chain, 11)
    _truncate(chain, 9)
    rc, _, stderr = non_finite_run.finish()
    out["non_finite"] = dict(rc=rc, stderr=stderr, before=before, left=_checkpoints(non_finite),
                             after=_digest(os.path.join(non_finite, "checkpoints")))
    for name, run in (("chain", Run(chain, env)), ("files", files_run)):
        rc, stdout, stderr = run.finish()
        out[name] = {"rc": rc, "stderr": stderr, "workdir": run.workdir}
    return out


def _digest(directory):
    """{relative path: sha256} of every file below `directory`."""
    digests = {}
    for path in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            digests[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return digests


def _assert_moved_aside(run, steps):
    for step in steps:
        moved = _moved_aside(run["workdir"], step)
        assert len(moved) == 1, _checkpoints(run["workdir"])
        assert f"checkpoint step {step} is unreadable" in run["stderr"] and moved[0] in run["stderr"]


def test_a_non_finite_loss_stops_naming_the_steps_and_saves_nothing_of_the_bad_state(runs):
    run = runs["non_finite"]
    assert run["rc"] == 1, run["stderr"][-3000:]
    last = run["stderr"].strip().splitlines()[-1]
    assert last.startswith("error: non-finite metrics") and "Traceback" not in run["stderr"], last
    assert "between steps 7 and 8; nothing was saved after step 7. The last good checkpoint is step 6 in " in last
    assert "lower optim.base_lr" in last
    assert run["left"] == ["3", "6"] and run["after"] == run["before"]


def test_kill_9_during_an_async_save_leaves_only_an_ignored_temporary_directory(runs):
    run = runs["kill_9"]
    assert run["rc"] == -signal.SIGKILL
    assert run["left"][:2] == ["3", "6"] and len(run["left"]) == 3, run["left"]
    assert run["left"][2].startswith("9.orbax-checkpoint-tmp"), run["left"]


def test_sigterm_mid_run_exits_0_with_a_checkpoint_at_the_stop_step(runs):
    run = runs["sigterm"]
    assert run["rc"] == 0, run["stderr"][-3000:]
    assert "resuming from step 6" in run["stderr"]  # the half-written step 9 was not taken for a checkpoint
    assert run["result"]["stopped_by"] == "signal" and run["result"]["step"] == 11
    assert [name for name in run["left"] if name.isdigit()] == ["11", "3", "6", "9"]


def test_after_all_faults_the_run_ends_exactly_like_a_straight_run(env, runs):
    run = runs["chain"]
    assert run["rc"] == 0, run["stderr"][-3000:]
    assert "resuming from step 6" in run["stderr"]  # 11 (random bytes) and 9 (truncated file) unreadable
    _assert_moved_aside(run, [11, 9])
    _assert_equals_reference(env, run["workdir"])


def test_a_missing_and_an_empty_file_in_the_two_newest_steps_resume_from_the_third_exactly(env, runs):
    run = runs["files"]
    assert run["rc"] == 0, run["stderr"][-3000:]
    assert "resuming from step 3" in run["stderr"]
    _assert_moved_aside(run, [9, 6])
    _assert_equals_reference(env, run["workdir"])
