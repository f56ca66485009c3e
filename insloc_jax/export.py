"""Export encoder weights to PyTorch naming: torchvision, mmdetection (the original repo) and detectron2.

Every exporter takes the flax variables {"params", "batch_stats"} of an `Encoder` and returns an ordered
{name: numpy array} state dict in PyTorch layout. The conversion is a rename table plus one layout rule:

  conv kernel [kh, kw, in, out] (HWIO) -> `weight` [out, in, kh, kw] (OIHW)
  dense kernel [in, out]              -> `weight` [out, in]
  BatchNorm scale / bias / mean / var -> `weight` / `bias` / `running_mean` / `running_var`, plus
                                         `num_batches_tracked` (int64 scalar)

`running_var` is exported as stored: our BatchNorm already keeps torch's unbiased running variance
(`models/norm.py`), so nothing is converted here.

`arch` names the PyTorch model the file is for ("fpn" or "c4"). The ResNet always goes out complete (for
a c4 encoder its res5 lives in the RoI head); the FPN neck and box head go out only when the variables
come from an fpn encoder, the C4 projection only to the mmdet file (detectron2 has no place for it).
A moco encoder thus exports its backbone into either layout.
"""

import os
import pickle
import sys
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

StateDict = Dict[str, np.ndarray]
FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                      "var": "running_var"}


def _torch_leaf(name: str, value: Any) -> Tuple[str, np.ndarray]:
    """One flax leaf -> (torch leaf name, array in torch layout)."""
    array = np.asarray(value)
    if name == "kernel" and array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif name == "kernel" and array.ndim == 2:
        array = array.T  # (in, out) -> (out, in)
    return FLAX_TO_TORCH_LEAF[name], np.ascontiguousarray(array)


def _modules(params: Mapping, stats: Mapping, num_batches_tracked: int, prefix: str = "") -> Dict:
    """Flattens a flax subtree into {"a/b/c" module path: {torch leaf: array}}, in definition order."""
    modules: Dict[str, Dict[str, np.ndarray]] = {}
    leaves = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            child = f"{prefix}{key}"
            modules.update(_modules(value, stats.get(key, {}), num_batches_tracked, child + "/"))
        else:
            name, array = _torch_leaf(key, value)
            leaves[name] = array
    for key in ("mean", "var"):
        if key in stats:
            name, array = _torch_leaf(key, stats[key])
            leaves[name] = array
    if "running_mean" in leaves:
        leaves["num_batches_tracked"] = np.array(num_batches_tracked, dtype=np.int64)
    if leaves:
        modules[prefix.rstrip("/")] = leaves
    return modules


def _emit(modules: Mapping[str, Mapping[str, np.ndarray]], rename: Callable[[str], Optional[str]]) -> StateDict:
    """Applies `rename` (flax module path -> torch module name, or None to drop) to every module."""
    out: StateDict = {}
    for path, leaves in modules.items():
        name = rename(path)
        if name is None:
            continue
        order = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        for leaf in sorted(leaves, key=order.index):
            out[f"{name}.{leaf}"] = leaves[leaf]
    return out


def encoder_arch(variables: Mapping) -> str:
    """Which Encoder arch produced `variables`: "fpn", "c4" or "moco"."""
    params = variables["params"]
    if "neck" in params:
        return "fpn"
    if "head" in params and "layer4" in params["head"]:
        return "c4"
    if "projection" in params:
        return "moco"
    raise ValueError("variables are not those of an insloc_jax Encoder (no neck, head or projection)")


def _check_target(arch: str):
    if arch not in ("fpn", "c4"):
        raise ValueError(f"export arch must be 'fpn' or 'c4' (the PyTorch model layout), got {arch!r}")


def _backbone_modules(variables: Mapping, num_batches_tracked: int) -> Dict:
    """torchvision-named ResNet modules ("conv1", "layer1/0/conv1", ...), res5 included for c4."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    modules = _modules(params["backbone"], stats.get("backbone", {}), num_batches_tracked)
    if "layer4" in params.get("head", {}):
        head_stats = stats.get("head", {}).get("layer4", {})
        modules.update(_modules(params["head"]["layer4"], head_stats, num_batches_tracked, "layer4/"))
    return modules


def _head_modules(variables: Mapping, num_batches_tracked: int) -> Dict:
    """Neck / head / projection modules keyed by their full flax path ("neck/lateral_convs_0/conv")."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    rest = {k: v for k, v in params.items() if k != "backbone"}
    rest_stats = {k: v for k, v in stats.items() if k != "backbone"}
    return {path: leaves for path, leaves in _modules(rest, rest_stats, num_batches_tracked).items()
            if not path.startswith("head/layer4")}


def to_torchvision(variables: Mapping, num_batches_tracked: int = 0) -> StateDict:
    """torchvision `resnet{18,34,50,101}` state dict without `fc` (load with strict=False or drop fc).

    Args:
      variables: flax variables {"params", "batch_stats"} of an Encoder (any arch).
      num_batches_tracked: value of every BatchNorm's `num_batches_tracked` (e.g. the training step).

    Returns:
      {"conv1.weight": [64, 3, 7, 7], "bn1.weight": [64], ..., "layer4.2.bn3.num_batches_tracked": []}.
    """
    return _emit(_backbone_modules(variables, num_batches_tracked), lambda path: path.replace("/", "."))


def _mmdet_head_name(path: str, arch: str, source: str) -> Optional[str]:
    """mmdetection name of a neck / head module of the original repository, or None to drop it."""
    parts = path.split("/")
    if source == "fpn" and arch == "fpn":
        if parts[0] == "neck":  # neck/lateral_convs_0/conv -> neck.lateral_convs.0.conv
            group, index = parts[1].rsplit("_", 1)
            return f"neck.{group}.{index}.{parts[2]}"
        if parts[1] == "fc_cls":
            return "roi_head.bbox_head.fc_cls"
        group, index = parts[1].rsplit("_", 1)  # shared_convs_0 / shared_fcs_0
        return ".".join(["roi_head.bbox_head", group, index] + parts[2:])
    if source == "c4" and arch == "c4":
        # Our choice for the unpublished C4 projection: the FPN head's names for fc1 / last fc.
        return {"head/projection/fc1": "roi_head.bbox_head.shared_fcs.0",
                "head/projection/fc2": "roi_head.bbox_head.fc_cls"}[path]
    return None


def to_mmdet(variables: Mapping, arch: str, num_batches_tracked: int = 0) -> StateDict:
    """The original InsLoc (mmdetection 2.x) checkpoint names for the query encoder.

    fpn: `backbone.*` (torchvision names), `neck.lateral_convs.{i}.conv|bn`, `neck.fpn_convs.{i}.conv|bn`,
         `roi_head.bbox_head.shared_convs.{i}.conv|bn`, `roi_head.bbox_head.shared_fcs.{i}`,
         `roi_head.bbox_head.fc_cls` (the 128-d projection).
    c4:  `backbone.*` up to `layer3`, `roi_head.shared_head.layer4.*`, and the projection MLP as
         `roi_head.bbox_head.shared_fcs.0` (2048 -> 2048) and `roi_head.bbox_head.fc_cls` (-> 128).

    Args:
      variables: flax variables of an Encoder.
      arch: "fpn" or "c4", the mmdetection model layout.
      num_batches_tracked: value of every BatchNorm's `num_batches_tracked`.

    Returns:
      {name: numpy array} in PyTorch layout.
    """
    _check_target(arch)
    source = encoder_arch(variables)

    def backbone_name(path):
        torch_name = path.replace("/", ".")
        if arch == "c4" and path.startswith("layer4"):
            return "roi_head.shared_head." + torch_name
        return "backbone." + torch_name

    out = _emit(_backbone_modules(variables, num_batches_tracked), backbone_name)
    out.update(_emit(_head_modules(variables, num_batches_tracked),
                     lambda path: _mmdet_head_name(path, arch, source)))
    return out


def _detectron2_resnet_name(path: str) -> str:
    """torchvision ResNet module path -> detectron2 ResNet name (without the model prefix)."""
    parts = path.split("/")
    if parts[0] in ("conv1", "bn1"):
        return "stem.conv1" if parts[0] == "conv1" else "stem.conv1.norm"
    stage = f"res{int(parts[0][len('layer'):]) + 1}"
    block, layer = parts[1], parts[2]
    if layer == "downsample":
        return f"{stage}.{block}.shortcut" + (".norm" if parts[3] == "1" else "")
    if layer.startswith("bn"):
        return f"{stage}.{block}.conv{layer[2:]}.norm"
    return f"{stage}.{block}.{layer}"


def _detectron2_head_name(path: str) -> Optional[str]:
    """FPN neck / box head module path -> detectron2 name; the 2nd fc and the projection are dropped."""
    parts = path.split("/")
    if parts[0] == "neck":
        group, index = parts[1].rsplit("_", 1)
        kind = "lateral" if group == "lateral_convs" else "output"
        return f"backbone.fpn_{kind}{int(index) + 2}" + (".norm" if parts[2] == "bn" else "")
    if parts[0] == "head" and parts[1].startswith("shared_convs_"):
        index = int(parts[1].rsplit("_", 1)[1])
        return f"roi_heads.box_head.conv{index + 1}" + (".norm" if parts[2] == "bn" else "")
    if path == "head/shared_fcs_0":
        return "roi_heads.box_head.fc1"
    return None


def to_detectron2(variables: Mapping, arch: str, num_batches_tracked: int = 0) -> StateDict:
    """detectron2 names (REFERENCE section 6) for an R-FPN or R-C4 model with STRIDE_IN_1X1 False.

    fpn: `backbone.bottom_up.stem.conv1(.norm)`, `backbone.bottom_up.res{2..5}.{b}.conv{k}(.norm)` and
         `.shortcut(.norm)`, `backbone.fpn_lateral{2..5}(.norm)`, `backbone.fpn_output{2..5}(.norm)`,
         `roi_heads.box_head.conv{1..4}(.norm)`, `roi_heads.box_head.fc1`.
    c4:  `backbone.stem.*`, `backbone.res{2..4}.*`, `roi_heads.res5.*`; the projection is dropped.

    Args:
      variables: flax variables of an Encoder.
      arch: "fpn" or "c4", the detectron2 model layout.
      num_batches_tracked: value of every BatchNorm's `num_batches_tracked` (SyncBN keeps it).

    Returns:
      {name: numpy array} in PyTorch layout, the `model` entry of a detectron2 weight file.
    """
    _check_target(arch)

    def backbone_name(path):
        name = _detectron2_resnet_name(path)
        if arch == "fpn":
            return "backbone.bottom_up." + name
        return ("roi_heads." if name.startswith("res5") else "backbone.") + name

    out = _emit(_backbone_modules(variables, num_batches_tracked), backbone_name)
    if arch == "fpn" and encoder_arch(variables) == "fpn":
        out.update(_emit(_head_modules(variables, num_batches_tracked), _detectron2_head_name))
    return out


def _write_atomic(path: str, write: Callable[[Any], None], force: bool):
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
        raise ImportError("save_pth needs PyTorch: `pip install torch` (the CPU build is enough)") from err
    tensors = {name: torch.from_numpy(np.array(value)) for name, value in state_dict.items()}
    payload = {wrap: tensors} if wrap else tensors
    _write_atomic(path, lambda f: torch.save(payload, f), force)


def save_detectron2_pkl(state_dict: Mapping[str, np.ndarray], path: str, force: bool = False):
    """Saves a detectron2 weight file: pickle of {"model", "__author__", "matching_heuristics": True}.

    Args:
      state_dict: {name: numpy array} from `to_detectron2`.
      path: destination `.pkl` file.
      force: overwrite an existing file (otherwise FileExistsError).
    """
    payload = {
        "model": {name: np.asarray(value) for name, value in state_dict.items()},
        "__author__": "insloc_jax",
        "matching_heuristics": True,
    }
    _write_atomic(path, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL), force)


FORMATS = ("torchvision", "mmdet", "detectron2")


def export_run(workdir: str, fmt: str, output: str, step: Optional[int] = None, arch: Optional[str] = None,
               force: bool = False) -> Tuple[str, int, int]:
    """Writes the query encoder of a run's checkpoint as PyTorch weights.

    Args:
      workdir: the training workdir.
      fmt: "torchvision" (.pth), "mmdet" (.pth, {"state_dict": ...}) or "detectron2" (.pkl).
      output: the file to write (never overwritten unless `force`).
      step: checkpoint step; None = newest.
      arch: target layout for mmdet / detectron2 ("fpn" or "c4"); None = the run's own (fpn for moco).

    Returns:
      (output path, checkpoint step, number of tensors written).
    """
    from insloc_jax.state import load_query_variables

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if os.path.exists(output) and not force:
        raise FileExistsError(f"{output} exists; choose another --output or pass --force to overwrite it")
    variables, config, step = load_query_variables(workdir, step)
    target = arch or ("fpn" if config.model.arch == "moco" else config.model.arch)
    steps_done = step  # each BatchNorm saw one training batch per step
    if fmt == "torchvision":
        state_dict = to_torchvision(variables, steps_done)
        save_pth(state_dict, output, force)
    elif fmt == "mmdet":
        state_dict = to_mmdet(variables, target, steps_done)
        save_pth(state_dict, output, force, wrap="state_dict")
    else:
        state_dict = to_detectron2(variables, target, steps_done)
        save_detectron2_pkl(state_dict, output, force)
    return output, step, len(state_dict)


def main(argv=None) -> int:
    """`python -m insloc_jax.export --workdir DIR --format F --output FILE [--step N] [--arch A] [--force]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m insloc_jax.export",
                                     description="Export a run's query encoder as PyTorch weights.")
    parser.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints/)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="file to write (.pth or .pkl)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--arch", choices=("fpn", "c4"), default=None, help="target layout (default: the run's)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = parser.parse_args(argv)
    try:
        path, step, count = export_run(args.workdir, args.format, args.output, args.step, args.arch, args.force)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {count} tensors of step {step} to {path} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
