"""What fine-tuning needs beyond the pretraining install, checked before anything else runs.

torchvision's detection models call its C++ operators (nms, roi_align). They load only with the regular
torch build from the package index: beside the CPU-only torch wheel that the pretraining tests can use,
torchvision imports but its operators are missing ("operator torchvision::nms does not exist"). So the
check calls one operator rather than trusting a successful import.
"""

INSTALL_HINT = ("pip install -r requirements-finetune.txt (torch, torchvision and pycocotools; "
                "`pip install -e .[finetune]` installs the same)")


class MissingDependency(ImportError):
    """A fine-tuning dependency is missing or broken; the message says what to install."""


def require() -> None:
    """Raises MissingDependency, with one line saying what to install, unless torch, torchvision (with its
    C++ operators) and pycocotools all work."""
    try:
        import pycocotools.mask  # noqa: F401
        import torch
        import torchvision
    except ImportError as error:
        raise MissingDependency(f"fine-tuning needs {error.name or 'a missing package'}: {INSTALL_HINT}") from None
    try:
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        torchvision.ops.nms(boxes, torch.ones(1), 0.5)
    except (RuntimeError, AttributeError) as error:
        raise MissingDependency(
            f"torchvision {torchvision.__version__} cannot run its operators with torch {torch.__version__} "
            f"({str(error).splitlines()[0]}): {INSTALL_HINT}") from None
