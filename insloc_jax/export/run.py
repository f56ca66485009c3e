"""`python -m insloc_jax.export`: a run's checkpoint -> a PyTorch weight file."""
import os
import sys
from typing import Optional, Tuple

from insloc_jax.export.convert import state_dict
from insloc_jax.export.files import FORMATS, write


def export_run(workdir: str, fmt: str, output: str, step: Optional[int] = None, arch: Optional[str] = None,
               force: bool = False) -> Tuple[str, int, int]:
    """Writes the query encoder of a run's checkpoint as PyTorch weights.

    Args:
      workdir: the training workdir.
      fmt: "torchvision" (.pth), "mmdet" (.pth, {"state_dict": ...}), "detectron2" (.pkl) or
        "torchvision_detection" (.pth, the Mask R-CNN of `insloc_jax.finetune.models.build_detector`).
      output: the file to write (never overwritten unless `force`).
      step: checkpoint step; None = newest.
      arch: target layout for mmdet / detectron2 / torchvision_detection ("fpn" or "c4"); None = the run's
        own (fpn for moco).

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
    # Each BatchNorm saw one training batch per step; torchvision's layout has no detector arch to follow.
    weights = state_dict(variables, fmt, target, num_batches_tracked=step)
    write(fmt, weights, output, force)
    return output, step, len(weights)


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
