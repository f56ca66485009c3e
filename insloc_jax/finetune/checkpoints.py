"""Fine-tuning checkpoints: the model, the optimizer and the iteration, one file per save.

`<workdir>/checkpoints/iter_<N>.pt` holds everything a resumed run needs: the data order, flips and the
RPN / RoI sampling are functions of (seed, iteration) (`loop.iteration_seed`), so model + optimizer +
iteration continue exactly where an uninterrupted run would be. Files are written atomically (a temporary
file renamed into place), so a kill during a save leaves the previous checkpoints as they were. A file that
cannot be read is moved aside (never deleted) and the next newest one is used.
"""
import datetime
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from insloc_jax.export.files import write_atomic

log = logging.getLogger(__name__)
_NAME = re.compile(r"iter_(\d+)\.pt")


class CheckpointMismatch(ValueError):
    """The workdir's checkpoints belong to another model; the message says what to do."""


def directory(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def saved(workdir: str) -> List[Tuple[int, str]]:
    """(iteration, path) of every checkpoint file in the workdir, oldest first."""
    folder = directory(workdir)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in os.listdir(folder) if (m := _NAME.fullmatch(name))]
    return sorted(found)


def save(workdir: str, iteration: int, model, optimizer, keep: int) -> str:
    """Writes `iter_<iteration>.pt` atomically, then removes all but the `keep` newest."""
    import torch

    payload = {"iteration": iteration, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    path = os.path.join(directory(workdir), f"iter_{iteration:07d}.pt")
    write_atomic(path, lambda f: torch.save(payload, f), force=True)
    for _, old in saved(workdir)[:-max(keep, 1)]:
        os.remove(old)
    return path


def restore(workdir: str, model, optimizer) -> Optional[int]:
    """Loads the newest readable checkpoint into `model` and `optimizer`.

    Returns:
      Its iteration, or None when the workdir has none (a fresh run).

    Raises:
      CheckpointMismatch: the checkpoint's tensors do not fit the model of this config.
    """
    for iteration, path in reversed(saved(workdir)):
        payload = _read(path)
        if payload is None:
            continue
        try:
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()
            raise CheckpointMismatch(
                f"{path} does not fit the model of this config ({' '.join(first[:2])[:300]}); resume with the "
                "config that wrote it (config.json in the workdir) or choose another --workdir") from None
        return iteration
    return None


def _read(path: str) -> Optional[Dict[str, Any]]:
    """The checkpoint's contents, or None after moving an unreadable file aside with a warning."""
    import pickle
    import zipfile

    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or "model" not in payload:
            raise ValueError("not a fine-tuning checkpoint")
        return payload
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = f"{path}.unreadable-{stamp}"
        os.replace(path, aside)
        log.warning("checkpoint %s cannot be read (%s); moved to %s, resuming from the one before",
                    path, str(error).splitlines()[0] if str(error) else type(error).__name__, aside)
        return None
