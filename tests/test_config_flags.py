"""Every config in configs/ has every field of configs/base.py, so any of them can be pointed at any data
source by `--config.<field>` flags, parsed as the commands parse them (absl + ml_collections)."""
import glob
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import base  # noqa: E402
from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax.data import sources  # noqa: E402

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


def _field_names(tree, prefix=""):
    """Dotted names of every leaf field of a nested dict."""
    names = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            names |= _field_names(value, f"{prefix}{key}.")
        else:
            names.add(prefix + key)
    return names


def _parsed(name, *overrides):
    """The config as `python -m insloc_jax.train --config configs/<name>.py <overrides>` sees it."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "run config", flag_values=values, lock_config=True)
    argv = ["train", "--config", os.path.join(ROOT, "configs", name + ".py"), *overrides]
    saved, sys.argv = sys.argv, argv  # ml_collections reads the overrides from sys.argv
    try:
        values(argv)
    finally:
        sys.argv = saved
    return values.config


def test_every_config_in_configs_is_found():
    assert {"base", "demo", "tiny", "insloc_fpn_200ep", "mocov2_200ep"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_has_exactly_the_fields_of_base(name):
    assert _field_names(_parsed(name).to_dict()) == _field_names(base.get_config().to_dict())


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_takes_a_folder_source_by_flags(name, tmp_path):
    config = _parsed(name, "--config.data.source.kind=folder", f"--config.data.source.root={tmp_path}")
    assert config_lib.source_spec(config) == {"kind": "folder", "root": str(tmp_path)}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_takes_a_file_list_source_by_flags(name, tmp_path):
    listing = tmp_path / "train.txt"
    config = _parsed(name, "--config.data.source.kind=file_list", f"--config.data.source.list_file={listing}",
                     f"--config.data.source.root={tmp_path}")
    assert config_lib.source_spec(config) == {"kind": "file_list", "list_file": str(listing),
                                              "root": str(tmp_path)}


def test_a_flag_set_source_opens_and_reads_the_images(tmp_path):
    from PIL import Image
    import numpy as np

    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    config = _parsed("demo", "--config.data.source.kind=folder", f"--config.data.source.root={tmp_path}")
    source = sources.open_source(config_lib.source_spec(config))
    means = [float(ex["image"].mean()) for ex in sources.examples(source)]
    assert means == [0.0, 40.0, 80.0]


def test_each_kind_keeps_only_its_own_fields():
    config = base.get_config()
    assert config_lib.source_spec(config) == {"kind": "tfds", "name": "imagenet2012", "split": "train",
                                              "image_key": "image", "in_memory": False}
    config.data.source.update(kind="synthetic", data_dir="d", num_train=8)
    assert config_lib.source_spec(config) == {"kind": "synthetic", "data_dir": "d", "split": "train",
                                              "image_size": 112, "num_train": 8, "num_test": 512,
                                              "num_classes": 10, "seed": 0}
    config.data.source.kind = "webdataset"
    with pytest.raises(config_lib.ConfigError, match="data.source.kind must be one of"):
        config_lib.source_spec(config)


def test_a_source_spec_with_another_kinds_field_is_refused():
    with pytest.raises(ValueError, match=r"a folder source has no fields \['num_train'\]"):
        sources.open_source({"kind": "folder", "root": "/nowhere", "num_train": 3})
