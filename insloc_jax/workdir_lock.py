"""One training process per workdir: an advisory lock that process 0 holds for the whole run.

Two runs on one workdir would interleave their checkpoint saves (both finalising the same step) and append
to one metrics file. The lock is `flock` on `<workdir>/.insloc_jax.lock`; the kernel releases it when its
holder exits or dies, so a crash or a kill never leaves a stale lock behind and a restart simply resumes.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket

LOCK_NAME = ".insloc_jax.lock"


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir; the message names it and says what to do."""


@contextlib.contextmanager
def hold(workdir: str):
    """Holds the workdir's lock for the duration of the block.

    Raises:
      WorkdirBusy: another process (of this or another run) holds it.
    """
    path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown process"
            raise WorkdirBusy(
                f"{workdir} is in use by another training run ({holder}); wait for it to finish or stop it "
                "(it saves a checkpoint on SIGTERM), or choose another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
