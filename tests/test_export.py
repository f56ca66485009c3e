"""Export: detectron2 key sets and shapes, layout of the exported arrays, writers.

The expected detectron2 names are generated below from detectron2's own module structure (read from
detectron2/modeling/backbone/resnet.py, fpn.py, roi_heads/box_head.py and roi_heads.py Res5ROIHeads):
BasicStem `stem.conv1` (+ `.norm`), stages `res2..res5` of BottleneckBlocks `conv1..conv3` (+ `.norm`,
no conv bias) with a `shortcut` (+ `.norm`) in the first block, FPN `fpn_lateral{2..5}` / `fpn_output{2..5}`
(no bias when normed), FastRCNNConvFCHead `conv{1..4}` (+ `.norm`) and `fc1`, Res5ROIHeads `res5`.
Norms are SyncBN (REFERENCE section 6), whose state dict includes `num_batches_tracked`.
Numerical correctness of the same arrays is covered by the parity tests (strict loads in PyTorch).
"""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from insloc_jax import export
from insloc_jax.models.encoder import Encoder

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
R50 = ((3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048))  # blocks, bottleneck, out channels


def _zeros_variables(arch, levels):
    shapes = jax.eval_shape(lambda: Encoder(arch).init(
        jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)), jnp.zeros((2, levels, 4)), train=False))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _conv_norm(name, cout, cin, k):
    keys = {f"{name}.weight": (cout, cin, k, k)}
    keys.update({f"{name}.norm.{leaf}": (() if leaf == "num_batches_tracked" else (cout,)) for leaf in BN})
    return keys


def _detectron2_resnet(prefix, stages):
    """detectron2 ResNet-50 keys for stages res2..: {name: shape}."""
    keys = _conv_norm(f"{prefix}stem.conv1", 64, 3, 7) if "res2" in stages else {}
    cin = 64
    for index, (blocks, mid, cout) in enumerate(R50):
        stage = f"res{index + 2}"
        for b in range(blocks):
            block_in = cin if b == 0 else cout
            if stage in stages:
                base = f"{stages[stage]}{stage}.{b}"
                if b == 0:
                    keys.update(_conv_norm(f"{base}.shortcut", cout, block_in, 1))
                keys.update(_conv_norm(f"{base}.conv1", mid, block_in, 1))
                keys.update(_conv_norm(f"{base}.conv2", mid, mid, 3))
                keys.update(_conv_norm(f"{base}.conv3", cout, mid, 1))
        cin = cout
    return keys


def _expected_detectron2_fpn():
    keys = _detectron2_resnet("backbone.bottom_up.", {f"res{i}": "backbone.bottom_up." for i in range(2, 6)})
    for level, (_, _, cin) in zip(range(2, 6), R50):
        keys.update(_conv_norm(f"backbone.fpn_lateral{level}", 256, cin, 1))
        keys.update(_conv_norm(f"backbone.fpn_output{level}", 256, 256, 3))
    for j in range(1, 5):
        keys.update(_conv_norm(f"roi_heads.box_head.conv{j}", 256, 256, 3))
    keys.update({"roi_heads.box_head.fc1.weight": (1024, 256 * 7 * 7), "roi_heads.box_head.fc1.bias": (1024,)})
    return keys


def _expected_detectron2_c4():
    stages = {"res2": "backbone.", "res3": "backbone.", "res4": "backbone.", "res5": "roi_heads."}
    return _detectron2_resnet("backbone.", stages)


@pytest.mark.parametrize("arch, levels, expected", [
    ("fpn", 4, _expected_detectron2_fpn), ("c4", 1, _expected_detectron2_c4)])
def test_detectron2_key_set_and_shapes(arch, levels, expected):
    state = export.to_detectron2(_zeros_variables(arch, levels), arch, num_batches_tracked=7)
    want = expected()
    assert set(state) == set(want)
    assert {k: v.shape for k, v in state.items()} == want
    counts = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert all(v.dtype == np.int64 and int(v) == 7 for v in counts)


def test_backbone_only_exports_from_moco_and_across_layouts():
    moco = _zeros_variables("moco", 1)
    fpn_want = {k for k in _expected_detectron2_fpn() if k.startswith("backbone.bottom_up.")}
    assert set(export.to_detectron2(moco, "fpn")) == fpn_want
    assert set(export.to_detectron2(moco, "c4")) == set(_expected_detectron2_c4())
    # An fpn encoder into the C4 layout: the ResNet only.
    assert set(export.to_detectron2(_zeros_variables("fpn", 4), "c4")) == set(_expected_detectron2_c4())
    tv = export.to_torchvision(moco)
    assert len(tv) == 318 and "layer4.2.bn3.running_var" in tv and "fc.weight" not in tv
    with pytest.raises(ValueError, match="'fpn' or 'c4'"):
        export.to_detectron2(moco, "moco")


def test_layout_rule_on_known_values():
    variables = _zeros_variables("fpn", 4)
    params = variables["params"]
    params["backbone"]["conv1"]["kernel"] = np.arange(7 * 7 * 3 * 64, dtype=np.float32).reshape(7, 7, 3, 64)
    params["head"]["shared_fcs_1"]["kernel"] = np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024)
    variables["batch_stats"]["neck"]["fpn_convs_3"]["bn"]["var"] = np.full(256, 2.5, np.float32)
    state = export.to_mmdet(variables, "fpn")
    # torch weight[o, i, y, x] == flax kernel[y, x, i, o]; linear weight[o, i] == kernel[i, o]
    assert state["backbone.conv1.weight"][5, 2, 1, 4] == params["backbone"]["conv1"]["kernel"][1, 4, 2, 5]
    assert state["roi_head.bbox_head.shared_fcs.1.weight"][3, 7] == 7 * 1024 + 3
    np.testing.assert_array_equal(state["neck.fpn_convs.3.bn.running_var"], 2.5)


def test_save_pth_roundtrip_no_clobber_and_atomic(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.num_batches_tracked": np.array(3)}
    path = tmp_path / "sub" / "w.pth"
    export.save_pth(state, path)
    loaded = torch.load(path)
    assert isinstance(loaded["a.weight"], torch.Tensor)
    np.testing.assert_array_equal(loaded["a.weight"].numpy(), state["a.weight"])
    assert loaded["a.num_batches_tracked"].dtype == torch.int64

    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="force=True"):
        export.save_pth({"b": np.ones(2)}, path)
    assert path.read_bytes() == before

    def failing_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        export.save_pth({"b": np.ones(2)}, path, force=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["w.pth"]
    monkeypatch.undo()
    export.save_pth({"b": np.ones(2)}, path, force=True)
    assert set(torch.load(path)) == {"b"}


def test_save_pth_without_torch_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(ImportError, match="requirements-finetune.txt"):
        export.save_pth({"a": np.ones(1)}, tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists()


def test_save_detectron2_pkl(tmp_path):
    state = export.to_detectron2(_zeros_variables("c4", 1), "c4")
    path = tmp_path / "model.pkl"
    export.save_detectron2_pkl(state, path)
    with open(path, "rb") as f:
        payload = pickle.load(f)
    assert payload["__author__"] == "insloc_jax" and payload["matching_heuristics"] is True
    assert set(payload["model"]) == set(state)
    assert all(isinstance(v, np.ndarray) for v in payload["model"].values())
    with pytest.raises(FileExistsError):
        export.save_detectron2_pkl(state, path)


def test_a_file_created_during_the_write_is_not_clobbered(tmp_path):
    path = tmp_path / "model.pkl"

    def write_while_another_writer_finishes(f):
        f.write(b"ours")
        path.write_bytes(b"theirs")

    with pytest.raises(FileExistsError):
        export.write_atomic(path, write_while_another_writer_finishes, force=False)
    assert path.read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["model.pkl"]
