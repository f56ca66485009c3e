"""Multi-host start-up: which arguments reach `jax.distributed.initialize` from flags, environment and SLURM."""
import jax
import pytest

from insloc_jax import parallel

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
              "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


@pytest.fixture
def calls(monkeypatch):
    """Records initialize calls instead of starting a runtime; clears the variables under test."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: seen.append((args, kwargs)))
    return seen


@pytest.mark.parametrize("spec, expected", [
    ("1(x4)", True), ("1", True), ("1,1(x2)", True), ("8(x2)", False), ("2,1", False), ("", False)])
def test_slurm_one_task_per_node(spec, expected):
    assert parallel.slurm_one_task_per_node({"SLURM_STEP_TASKS_PER_NODE": spec}) is expected


def test_single_process_starts_nothing(calls):
    assert parallel.initialize_distributed() is False
    assert calls == []


def test_processes_without_coordinator_is_an_error(calls):
    with pytest.raises(ValueError, match="coordinator"):
        parallel.initialize_distributed(num_processes=2)


def test_flags_and_environment(calls, monkeypatch):
    assert parallel.initialize_distributed("h:1", 2, 1)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:2")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert parallel.initialize_distributed()
    assert calls == [(("h:1", 2, 1), {"local_device_ids": None}), (("h:2", 4, 3), {"local_device_ids": None})]


@pytest.mark.parametrize("tasks, local_ids", [("1(x2)", []), ("8(x2)", None)])
def test_slurm_task_layouts(calls, monkeypatch, tasks, local_ids):
    """One task per node keeps all its GPUs ([]); one task per GPU leaves JAX's per-rank default (None)."""
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2" if tasks == "1(x2)" else "16")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", tasks)
    assert parallel.initialize_distributed()
    assert calls == [((None, None, None), {"local_device_ids": local_ids})]


def test_explicit_device_ids_win_under_slurm(calls, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x2)")
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")
    parallel.initialize_distributed()
    assert calls[0][1] == {"local_device_ids": None}
