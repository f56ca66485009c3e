"""One run per workdir: a held lock stops a second run before it writes anything; a dead holder frees it."""
import os
import subprocess
import sys

import pytest

from insloc_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _holder(workdir, seconds):
    """A separate process that takes the lock, says READY, and keeps it for `seconds`."""
    code = ("import time; from insloc_jax import workdir_lock\n"
            f"with workdir_lock.hold({str(workdir)!r}):\n"
            f"    print('READY', flush=True); time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.readline().strip() == "READY"
    return proc


def test_a_live_holder_blocks_and_is_named(tmp_path):
    proc = _holder(tmp_path, 60)
    try:
        with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {proc.pid} on "):
            with workdir_lock.hold(str(tmp_path)):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path, 60)
    proc.kill()
    proc.wait()
    with workdir_lock.hold(str(tmp_path)):
        pass


def test_the_lock_is_released_after_the_block_and_names_its_new_holder(tmp_path):
    """`hold` never waits: taking it again only works because the first block released it."""
    with workdir_lock.hold(str(tmp_path)):
        pass
    with workdir_lock.hold(str(tmp_path)):
        recorded = (tmp_path / workdir_lock.LOCK_NAME).read_text()
        assert recorded.startswith(f"pid {os.getpid()} on ")
