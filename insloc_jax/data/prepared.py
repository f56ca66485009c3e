"""A dataset generated once into a temporary directory and renamed into place.

The embedded datasets (synthetic.py, scenes.py) are written on first use and reused afterwards. A set
counts as prepared when its directory holds `info.json`, which a generation writes last. Generation goes
into a temporary sibling directory, `<version>.incomplete-<host>-<pid>`, that is renamed to `<version>` only
once it is complete, so a killed generation never leaves a set that counts as prepared; the next generation
on the same host removes such leftovers whose process is gone. Two processes preparing the same set at once
both generate it, and the one that renames second keeps the first one's set.
"""
import os
import shutil
import socket
from typing import Callable

INFO_FILE = "info.json"
_INCOMPLETE = ".incomplete-"


def is_complete(directory: str) -> bool:
    """Whether `directory` holds a finished generation (its info.json is written last)."""
    return os.path.isfile(os.path.join(directory, INFO_FILE))


def prepare_once(final: str, generate: Callable[[str], None], what: str) -> str:
    """Returns `final`, first running `generate` to fill it unless it is complete already.

    Args:
      final: the set's directory, `.../<version>`.
      generate: writes the whole set, info.json last, into the empty directory it is given.
      what: the set's name for error messages, e.g. "embedded dataset".

    Returns:
      `final`, complete.

    Raises:
      FileExistsError: `final` exists but is not complete (not made by a generation of this module).
    """
    if is_complete(final):
        return final
    parent, version = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(parent, version)
    work = os.path.join(parent, f"{version}{_INCOMPLETE}{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        os.makedirs(work)
        generate(work)
        try:
            os.rename(work, final)  # atomic: the set appears complete or not at all
        except OSError as err:
            if not is_complete(final):  # else another process finished the same set first
                raise FileExistsError(f"{final} exists but is not a complete {what} (it has no {INFO_FILE}): "
                                      "remove it and run again") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _remove_leftovers(parent: str, version: str) -> None:
    """Removes temporary directories of generations on this host whose process is gone (killed runs)."""
    prefix = f"{version}{_INCOMPLETE}{socket.gethostname()}-"
    for entry in os.listdir(parent):
        pid = entry[len(prefix):]
        if entry.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process of this id exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
