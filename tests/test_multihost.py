"""Two processes with two CPU devices each (gloo collectives on 127.0.0.1) train like one process with four."""
import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
TRAIN_WORKER = os.path.join(os.path.dirname(__file__), "multihost_train_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(script, args, cache_dir=None):
    """Starts a worker script with its own device count (XLA_FLAGS cleared), output captured.

    With `cache_dir`, the worker keeps its compiled programs there (JAX's persistent cache, every program),
    so a second build of the same step in that process loads it instead of compiling again.
    """
    env = dict(os.environ, XLA_FLAGS="")  # each worker sets its own
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen([sys.executable, script] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _reported(proc, tag, timeout):
    """The JSON a worker printed on its last `TAG <json>` line, after checking it exited cleanly."""
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith(tag + " ")]
    assert proc.returncode == 0 and lines, out[-3000:]
    return json.loads(lines[-1][len(tag) + 1:])


def test_two_processes_of_two_devices_equal_one_process_of_four():
    port = _free_port()
    procs = [_spawn(WORKER, [p, 2, port, 2]) for p in range(2)] + [_spawn(WORKER, [0, 1, 0, 4])]
    first, second, single = (_reported(p, "LOSSES", timeout=400) for p in procs)
    assert first == second, "every process reports the same (averaged) losses"
    assert len(single) == 3
    for a, b in zip(first, single):
        assert a == pytest.approx(b, rel=1e-5)


def test_training_command_on_two_processes_stops_together_and_resumes(tmp_path):
    """A SIGTERM reaching one process stops both at the same step with one shared checkpoint; rerunning
    resumes from it to the end."""
    port = _free_port()
    procs = [_spawn(TRAIN_WORKER, [p, 2, port, tmp_path / "data", tmp_path / "run"], tmp_path / f"xla{p}")
             for p in range(2)]
    results = [_reported(proc, "RESULTS", timeout=500) for proc in procs]
    assert results[0] == results[1], "both processes stop, resume and finish at the same steps"
    stopped, finished = results[0]
    assert stopped["step"] == 4 and stopped["stopped_by"] == "signal"
    assert finished["step"] == 8 and finished["stopped_by"] is None
    assert sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit()) == [4, 8]
