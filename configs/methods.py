"""The three pretraining methods as the settings that make them: the one table the published configs,
scripts/compare_probes.py and the reference-step tests take a method from. Everything else (sizes, schedule,
data) is the config's."""
import ml_collections

METHODS = {
    "insloc_fpn": dict(label="InsLoc-FPN", arch="fpn", mode="insloc", levels=(3,), nesterov=True),  # P5 box aug
    "insloc_c4": dict(label="InsLoc-C4", arch="c4", mode="insloc", levels=(0,), nesterov=True),  # its one level
    "mocov2": dict(label="MoCo-v2", arch="moco", mode="moco", levels=(), nesterov=False),  # whole-image views
}
BY_ARCH = {spec["arch"]: name for name, spec in METHODS.items()}  # "fpn" -> "insloc_fpn", ...


def apply(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Sets `method`'s model.arch, data.mode, box_aug.levels and optim.nesterov on `config` (in place)."""
    spec = METHODS[method]
    config.model.arch = spec["arch"]
    config.data.mode = spec["mode"]
    config.box_aug.levels = spec["levels"]
    config.optim.nesterov = spec["nesterov"]
    return config
