"""The torchvision_detection export loaded into the real torchvision Mask R-CNNs of insloc_jax.finetune.

Tiny encoders (ResNet-18 / -50 of width 8, small FPN and head) with randomised BatchNorm state are exported,
written as the command writes them, and loaded with `weights.load_export`. Parity: in eval mode the
detector's res2..res5, P2..P5 and box-head fc features equal the JAX encoder's to 1e-4 relative, both heads
fed the same RoI features (torchvision's roi_align, aligned, on the JAX pyramid).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from configs.finetune import base as finetune_base  # noqa: E402
from insloc_jax import export  # noqa: E402
from insloc_jax.finetune import models, weights  # noqa: E402
from insloc_jax.models.encoder import FPN_STRIDES, Encoder  # noqa: E402
from parity import from_nchw, randomize_batchnorm, rel_err, to_nchw  # noqa: E402

SIZE = 64
TOL = 1e-4
DIMS = dict(depth=18, width=8, fpn_dim=16, head_conv_dim=16, head_fc_dim=32)
ENCODER_DIMS = dict(DIMS, dim=16, mlp_dim=32)
NUM_CLASSES = 5
EXTRA_NORM = "roi_heads.box_head.7."  # the extra BatchNorm1d after the fc: never in an export
FC1_END = 4 + 3  # FastRCNNConvFCHead of 4 convs: convs 0..3, Flatten 4, fc 5, its ReLU 6


def _images(seed=0, batch=2):
    return np.random.default_rng(seed).normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)


def _variables(arch, seed, **dims):
    model = Encoder(arch, **{**ENCODER_DIMS, **dims})
    levels = 4 if arch == "fpn" else 1
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, SIZE, SIZE, 3)),
                                           jnp.zeros((1, levels, 4)), train=False))()
    return randomize_batchnorm(variables, seed + 1)


@pytest.fixture(scope="module")
def encoders():
    return {"fpn": _variables("fpn", 0), "c4": _variables("c4", 2), "moco": _variables("moco", 4)}


def _detector(arch, **dims):
    fields = dict(finetune_base.get_config().model)
    fields.update(DIMS, mask_conv_dim=16, **dims)
    torch.manual_seed(0)
    return models.build_detector(arch, NUM_CLASSES, **fields)


def _write(variables, arch, path, fmt="torchvision_detection"):
    state = export.state_dict(variables, fmt, arch, num_batches_tracked=7)
    export.write(fmt, state, str(path))
    return state


@pytest.mark.parametrize("encoder, arch, prefixes", [
    ("fpn", "fpn", ("backbone.body.", "backbone.fpn.", "roi_heads.box_head.")),
    ("c4", "c4", ("backbone.body.", "roi_heads.box_head.layer4.")),
    ("moco", "fpn", ("backbone.body.",)),
    ("moco", "c4", ("backbone.body.", "roi_heads.box_head.layer4.")),
    ("c4", "fpn", ("backbone.body.",)),
    ("fpn", "c4", ("backbone.body.", "roi_heads.box_head.layer4.")),
])
def test_every_exported_tensor_lands(encoders, tmp_path, encoder, arch, prefixes):
    state = _write(encoders[encoder], arch, tmp_path / "w.pth")
    model = _detector(arch)
    model_state = model.state_dict()
    want = {k for k in model_state if k.startswith(prefixes) and not k.startswith(EXTRA_NORM)}
    assert set(state) == want  # the export fills exactly these parts of the detector
    report = weights.load_export(model, str(tmp_path / "w.pth"))
    assert set(report.loaded_names) == want and report.loaded == len(state)
    assert report.initialised == len(model_state) - len(state)
    assert set(report.initialised_names) == set(model_state) - want
    loaded = model.state_dict()
    assert all(np.array_equal(loaded[k].numpy(), v) for k, v in state.items())
    assert int(loaded["backbone.body.bn1.num_batches_tracked"]) == 7


def test_c4_detector_holds_res5_once():
    names = list(_detector("c4").state_dict())
    assert not any(n.startswith("backbone.body.layer4") for n in names)
    assert sum(n.startswith("roi_heads.box_head.layer4.0.conv1.") for n in names) == 1
    assert not any(n.startswith("roi_heads.mask_head") for n in names)
    assert "roi_heads.mask_predictor.conv5_mask.weight" in names


def test_head_conv_count_places_the_fc(tmp_path):
    state = _write(_variables("fpn", 6, head_convs=2), "fpn", tmp_path / "w.pth")
    assert "roi_heads.box_head.3.weight" in state  # 2 convs, the Flatten, then the fc
    report = weights.load_export(_detector("fpn", head_convs=2), str(tmp_path / "w.pth"))
    assert report.loaded == len(state)


def _torch_stages(body, x):
    """res2.. outputs of a detector's `backbone.body`, by running its children in order."""
    out = {}
    for name, module in body.named_children():
        x = module(x)
        if name.startswith("layer"):
            out[f"res{int(name[5:]) + 1}"] = x
    return out


def _fpn_rois(pyramid, seed=8):
    """Three random boxes per level, pooled 7x7 from the JAX P-levels: torch [R, C, 7, 7]."""
    rng = np.random.default_rng(seed)
    pooled = []
    for level, stride in zip(("p2", "p3", "p4", "p5"), FPN_STRIDES):
        xy = rng.uniform(0, 32, (3, 2))
        boxes = np.concatenate([np.zeros((3, 1)), xy, xy + rng.uniform(8, 32, (3, 2))], 1)
        pooled.append(torchvision.ops.roi_align(to_nchw(pyramid[level][:1]), torch.tensor(boxes, dtype=torch.float32),
                                                7, 1.0 / stride, 2, aligned=True))
    return torch.cat(pooled)


def _jax_fc1(variables, rois_nhwc):
    """The FPN head's first fc after its ReLU: [R, head_fc_dim]."""
    keep = lambda mdl, method: mdl.name == "shared_fcs_0"  # noqa: E731
    _, inter = jax.jit(lambda v, r: Encoder("fpn", **ENCODER_DIMS).apply(
        v, r, method=lambda m, x: m.head(x, train=False), capture_intermediates=keep))(variables, rois_nhwc)
    return np.maximum(inter["intermediates"]["head"]["shared_fcs_0"]["__call__"][0], 0.0)


def test_fpn_parity(encoders, tmp_path):
    variables, images = encoders["fpn"], _images(1)
    keep = lambda mdl, method: mdl.name == "backbone" and method == "__call__"  # noqa: E731
    pyramid, inter = jax.jit(lambda v: Encoder("fpn", **ENCODER_DIMS).apply(
        v, images, method=Encoder.pyramid, capture_intermediates=keep))(variables)
    feats = inter["intermediates"]["backbone"]["__call__"][0]
    _write(variables, "fpn", tmp_path / "w.pth")
    model = _detector("fpn")
    weights.load_export(model, str(tmp_path / "w.pth"))
    model.eval()
    rois = _fpn_rois(pyramid)
    with torch.no_grad():
        t_feats = _torch_stages(model.backbone.body, to_nchw(images))
        t_levels = model.backbone(to_nchw(images))
        t_fc1 = torch.nn.Sequential(*list(model.roi_heads.box_head)[:FC1_END])(rois)  # convs, Flatten, fc, ReLU
    errors = {name: rel_err(feats[name], from_nchw(t_feats[name])) for name in t_feats}
    errors.update({f"p{i + 2}": rel_err(pyramid[f"p{i + 2}"], from_nchw(t_levels[str(i)])) for i in range(4)})
    errors["fc1"] = rel_err(_jax_fc1(variables, rois.permute(0, 2, 3, 1).numpy()), t_fc1.numpy())
    assert sorted(errors) == ["fc1", "p2", "p3", "p4", "p5", "res2", "res3", "res4", "res5"]
    assert max(errors.values()) <= TOL, errors
    assert t_fc1.shape == (12, DIMS["head_fc_dim"]) and float(t_fc1.abs().max()) > 0


def test_c4_parity_bottleneck(tmp_path):
    variables, images = _variables("c4", 10, depth=50), _images(2)
    feats = jax.jit(lambda v: Encoder("c4", **{**ENCODER_DIMS, "depth": 50}).apply(
        v, images, method=Encoder.features))(variables)
    _write(variables, "c4", tmp_path / "w.pth")
    model = _detector("c4", depth=50)
    assert weights.load_export(model, str(tmp_path / "w.pth")).loaded > 0
    model.eval()
    with torch.no_grad():
        t_feats = _torch_stages(model.backbone.body, to_nchw(images))
        t_feats["res5"] = model.roi_heads.box_head.res5(t_feats["res4"])  # res5 on the whole res4 map
    errors = {name: rel_err(feats[name], from_nchw(t_feats[name])) for name in t_feats}
    assert sorted(errors) == ["res2", "res3", "res4", "res5"]
    assert max(errors.values()) <= TOL, errors


def test_backbone_transfer_loads_only_the_resnet(encoders, tmp_path):
    state = _write(encoders["fpn"], "fpn", tmp_path / "w.pth")
    model = _detector("fpn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = weights.load_export(model, str(tmp_path / "w.pth"), transfer="backbone")
    body = {k for k in state if k.startswith("backbone.body.")}
    assert set(report.loaded_names) == body and len(body) < len(state)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after if k not in body)
    assert not torch.equal(after["backbone.body.conv1.weight"], before["backbone.body.conv1.weight"])


def _fails(model, path, match, error=weights.ExportMismatch):
    before = path.read_bytes()
    with pytest.raises(error, match=match):
        weights.load_export(model, str(path))
    assert path.read_bytes() == before  # only read


def test_shape_mismatch_names_the_tensor_and_both_shapes(encoders, tmp_path):
    _write(encoders["fpn"], "fpn", tmp_path / "w.pth")
    _fails(_detector("fpn", width=16), tmp_path / "w.pth",
           r"backbone\.body\.bn1\.weight has shape \(8,\) in the file but \(16,\) in the model; "
           r"config\.model")
    _fails(_detector("fpn", head_fc_dim=48), tmp_path / "w.pth",
           r"roi_heads\.box_head\.5\.weight has shape \(32, 784\) in the file but \(48, 784\)")


def test_an_export_for_the_other_arch_says_how_to_fix_it(encoders, tmp_path):
    _write(encoders["c4"], "c4", tmp_path / "c4.pth")
    _fails(_detector("fpn"), tmp_path / "c4.pth",
           r"roi_heads\.box_head\.layer4\.\S+ .*written for arch c4; re-export with `--arch fpn`")
    _write(encoders["fpn"], "fpn", tmp_path / "fpn.pth")
    _fails(_detector("c4"), tmp_path / "fpn.pth", r"backbone\.body\.layer4\.\S+ .*--arch c4` or set --config\.arch=fpn")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load reading the detectron2 pickle
def test_other_files_are_refused_with_the_export_command(encoders, tmp_path):
    model, command = _detector("fpn"), "--format torchvision_detection --arch fpn"
    for fmt, name in (("mmdet", "mm.pth"), ("detectron2", "d2.pkl"), ("torchvision", "tv.pth")):
        _write(encoders["fpn"], "fpn" if fmt != "torchvision" else None, tmp_path / name, fmt)
        _fails(model, tmp_path / name, f"is not a torchvision_detection export .*{command}")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    _fails(model, tmp_path / "junk.pth", "torch.load failed")
    with pytest.raises(FileNotFoundError, match=f"does not exist; write it with .*{command}"):
        weights.load_export(model, str(tmp_path / "missing.pth"))


def test_export_command_writes_a_loadable_file(encoders, tmp_path, monkeypatch):
    import ml_collections

    from insloc_jax import state as state_lib

    config = ml_collections.ConfigDict({"model": {"arch": "c4"}})
    monkeypatch.setattr(state_lib, "load_query_variables", lambda workdir, step: (encoders["c4"], config, 3))
    out = tmp_path / "w.pth"
    assert export.main(["--workdir", str(tmp_path), "--format", "torchvision_detection", "--output", str(out)]) == 0
    report = weights.load_export(_detector("c4"), str(out))
    assert report.loaded == len(torch.load(out, weights_only=True))
    assert int(torch.load(out, weights_only=True)["backbone.body.bn1.num_batches_tracked"]) == 3
    assert export.main(["--workdir", str(tmp_path), "--format", "torchvision_detection", "--arch", "fpn",
                        "--output", str(tmp_path / "fpn.pth")]) == 0
    assert weights.load_export(_detector("fpn"), str(tmp_path / "fpn.pth")).loaded > 0


def test_importing_the_package_and_export_does_not_import_torch():
    code = "import sys, insloc_jax.finetune, insloc_jax.export; assert 'torch' not in sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"))
