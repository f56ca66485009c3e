"""Writing weight files: one atomic writer, and the two file kinds (.pth of tensors, detectron2 .pkl)."""
import os
import pickle
import tempfile
from typing import Any, Callable, Mapping, Optional

import numpy as np

# format -> (file suffix, what the file holds around the state dict); `write` is the one writer.
FILES = {
    "torchvision": ("pth", None),  # the bare state dict
    "mmdet": ("pth", "state_dict"),  # {"state_dict": ...}, what mmcv's load_checkpoint reads
    "detectron2": ("pkl", "model"),  # {"model": ..., "__author__", "matching_heuristics": True}
    "torchvision_detection": ("pth", None),  # the bare state dict of a torchvision Mask R-CNN (finetune/)
}
FORMATS = tuple(FILES)


def write_atomic(path: str, write: Callable[[Any], None], force: bool):
    """Writes through a temporary file in the target directory, then moves it to `path`.

    A failure at any point leaves an existing file untouched and no temporary file behind. Without
    `force` the final step is a hard link, which fails rather than replace a file created meanwhile.
    """
    path = os.fspath(path)
    exists_error = f"{path} exists; pass force=True to overwrite it"
    if os.path.exists(path) and not force:
        raise FileExistsError(exists_error)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        if force:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path, exists_error)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _link_no_clobber(tmp: str, path: str, exists_error: str):
    """Moves `tmp` to `path` unless `path` exists (hard link where the file system has them)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(exists_error) from None
    except OSError:
        if os.path.exists(path):
            raise FileExistsError(exists_error) from None
        os.replace(tmp, path)


def save_pth(state_dict: Mapping[str, np.ndarray], path: str, force: bool = False, wrap: Optional[str] = None):
    """Saves a state dict as a PyTorch `.pth` file of tensors (`torch.load` + `load_state_dict`).

    Args:
      state_dict: {name: numpy array}, e.g. from `to_torchvision` or `to_mmdet`.
      path: destination file.
      force: overwrite an existing file (otherwise FileExistsError).
      wrap: store {wrap: tensors} instead of the bare dict ("state_dict" for mmcv / mmdetection's
        `load_checkpoint`).
    """
    try:
        import torch
    except ImportError as err:
        raise ImportError("writing .pth files needs PyTorch: `pip install -r requirements-finetune.txt` "
                          "(a CPU-only torch build is enough for export alone)") from err
    tensors = {name: torch.from_numpy(np.array(value)) for name, value in state_dict.items()}
    payload = {wrap: tensors} if wrap else tensors
    write_atomic(path, lambda f: torch.save(payload, f), force)


def save_detectron2_pkl(state_dict: Mapping[str, np.ndarray], path: str, force: bool = False):
    """Saves a detectron2 weight file: pickle of {"model", "__author__", "matching_heuristics": True}.

    Args:
      state_dict: {name: numpy array} from `to_detectron2`.
      path: destination `.pkl` file.
      force: overwrite an existing file (otherwise FileExistsError).
    """
    payload = {
        FILES["detectron2"][1]: {name: np.asarray(value) for name, value in state_dict.items()},
        "__author__": "insloc_jax",
        "matching_heuristics": True,
    }
    write_atomic(path, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL), force)


def write(fmt: str, state_dict: Mapping[str, np.ndarray], path: str, force: bool = False):
    """Writes `state_dict` as the file `fmt` (a key of FILES) is read from."""
    suffix, wrap = FILES[fmt]
    if suffix == "pkl":
        save_detectron2_pkl(state_dict, path, force)  # its wrapper key comes from FILES too
    else:
        save_pth(state_dict, path, force, wrap)
