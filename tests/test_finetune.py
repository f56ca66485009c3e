"""`python -m insloc_jax.finetune` as a user runs it: a subprocess on a tiny embedded detection set.

From random init and from an export, end to end: the metrics it reports equal pycocotools run on the
detection files it saved. Killed with SIGKILL and restarted with the same command, it ends with exactly the
weights of an uninterrupted run. Bad input (a missing annotations file, an export of the other detector,
a corrupt image, a missing dependency) gets one clear line and destroys nothing.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from xla_flags import flags as xla_test_flags  # noqa: E402

SCENES = dict(image_size=64, num_train=12, num_val=6, num_classes=3, seed=0)
TINY = [
    "--config.model.width=8", "--config.model.fpn_dim=16", "--config.model.head_conv_dim=16",
    "--config.model.head_fc_dim=32", "--config.model.mask_conv_dim=16", "--config.model.min_size=64",
    "--config.model.max_size=64", "--config.model.anchor_sizes=(4,8,16,32,64)",
    "--config.model.roi_canonical_scale=28", "--config.data.image_size=64", "--config.data.num_train=12",
    "--config.data.num_val=6", "--config.data.num_classes=3", "--config.schedule.batch=2",
    "--config.schedule.iterations=6", "--config.schedule.checkpoint_every=2", "--config.schedule.log_every=1",
    "--config.schedule.warmup=2", "--config.schedule.steps=(4,)", "--config.schedule.threads=1",
]


def _command(workdir, data_dir, *overrides):
    config = os.path.join(ROOT, "configs", "finetune", "demo.py")
    return [sys.executable, "-m", "insloc_jax.finetune", "--config", config, "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", *TINY, *overrides]


def _env():
    return dict(os.environ, XLA_FLAGS=xla_test_flags(), JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")


def _run(workdir, data_dir, *overrides, check=True):
    done = subprocess.run(_command(workdir, data_dir, *overrides), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _last_error(done):
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr[-3000:]
    return last


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _scenes_dir(data_dir):
    from insloc_jax.data import scenes

    return scenes.dataset_dir(data_dir, **SCENES)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def random_init_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("random_init")
    return workdir, _run(workdir, data_dir)


def test_metrics_equal_pycocotools_on_the_saved_detections(random_init_run, data_dir):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from insloc_jax.data import scenes

    workdir, done = random_init_run
    with open(workdir / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["iteration"] == 6 and len([k for k in metrics if "/" in k]) == 24
    gt = COCO(scenes.split_paths(_scenes_dir(data_dir), "val")[1])
    for iou_type in ("bbox", "segm"):
        with open(workdir / f"detections_{iou_type}.json") as f:
            results = json.load(f)
        assert results, f"no {iou_type} detections"
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
        for name, value in zip(names, evaluator.stats):
            assert metrics[f"{iou_type}/{name}"] == pytest.approx(value, abs=1e-12), name
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["metrics"]["bbox/AP"] == metrics["bbox/AP"] and summary["skipped_images"] == 0
    assert "random init" in done.stderr
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any("eval/bbox/AP" in r for r in logged) and os.listdir(workdir / "tensorboard")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["iter_0000004.pt", "iter_0000006.pt"]  # keep 2


def test_sigkill_then_restart_ends_with_the_uninterrupted_weights(random_init_run, data_dir, tmp_path):
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_command(workdir, data_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = workdir / "checkpoints" / "iter_0000002.pt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists()
    assert not (workdir / "checkpoints" / "iter_0000006.pt").exists(), "the run finished before the kill"
    done = _run(workdir, data_dir)
    assert "resuming from iteration" in done.stderr
    reference = _weights(random_init_run[0] / "checkpoints" / "iter_0000006.pt")
    resumed = _weights(workdir / "checkpoints" / "iter_0000006.pt")
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name


def _export(path, arch, encoder_arch="fpn"):
    """An export of a tiny JAX encoder of the TINY sizes for the `arch` detector, written as the export
    command writes it."""
    import jax
    import jax.numpy as jnp

    from insloc_jax.export.convert import state_dict
    from insloc_jax.export.files import write
    from insloc_jax.models.encoder import Encoder

    encoder = Encoder(encoder_arch, depth=18, width=8, dim=16, fpn_dim=16, head_conv_dim=16, head_fc_dim=32,
                      mlp_dim=32)
    variables = encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 4, 4)), False)
    write("torchvision_detection", state_dict(variables, "torchvision_detection", arch, 3), str(path))
    return str(path)


def test_fine_tunes_from_an_export_and_loads_every_tensor(tmp_path, data_dir):
    weights = _export(tmp_path / "fpn.pth", "fpn")
    done = _run(tmp_path / "run", data_dir, f"--config.weights={weights}", "--config.schedule.iterations=2")
    file_tensors = len(torch.load(weights, weights_only=True))
    assert f"loaded {file_tensors} tensors from {weights}" in done.stderr
    with open(tmp_path / "run" / "metrics.json") as f:
        assert json.load(f)["iteration"] == 2


def test_an_export_of_the_other_detector_is_refused_and_left_as_it_was(tmp_path, data_dir):
    weights = _export(tmp_path / "c4.pth", "c4", encoder_arch="c4")
    before = open(weights, "rb").read()
    last = _last_error(_run(tmp_path / "run", data_dir, f"--config.weights={weights}", check=False))
    assert "--arch" in last
    assert open(weights, "rb").read() == before
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_missing_annotations_file_is_one_clear_error(tmp_path, data_dir):
    last = _last_error(_run(
        tmp_path / "run", data_dir, "--config.data.kind=coco", f"--config.data.train_images={tmp_path}",
        f"--config.data.train_annotations={tmp_path / 'missing.json'}", f"--config.data.val_images={tmp_path}",
        f"--config.data.val_annotations={tmp_path / 'v.json'}", check=False))
    assert "missing.json" in last and "train_annotations" in last


def test_a_corrupt_image_is_skipped_and_counted(tmp_path, data_dir, random_init_run):
    from insloc_jax.data import scenes
    from insloc_jax.finetune import coco

    copy = tmp_path / "coco"
    shutil.copytree(_scenes_dir(data_dir), copy)
    (train_images, train_json), (val_images, val_json) = (scenes.split_paths(str(copy), s) for s in ("train", "val"))
    split = coco.load_split(train_images, train_json)
    first_batch = coco.batch_indices(split, 2, 0, 0)  # what iteration 0 of seed 0 reads
    path = os.path.join(train_images, split.images[int(first_batch[0])].file_name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # a truncated JPEG
    done = _run(tmp_path / "run", data_dir, "--config.data.kind=coco", f"--config.data.train_images={train_images}",
                f"--config.data.train_annotations={train_json}", f"--config.data.val_images={val_images}",
                f"--config.data.val_annotations={val_json}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["skipped_images"] >= 1 and summary["iteration"] == 6


def test_a_missing_dependency_names_the_requirements_file(tmp_path, data_dir):
    fake = tmp_path / "fake"
    (fake / "torchvision").mkdir(parents=True)
    (fake / "torchvision" / "__init__.py").write_text("raise ImportError(name='torchvision')\n")
    env = dict(_env(), PYTHONPATH=f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(_command(tmp_path / "run", data_dir), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    last = _last_error(done)
    assert "requirements-finetune.txt" in last and "torchvision" in last


def test_sigterm_saves_the_iteration_it_stops_at(tmp_path, data_dir):
    workdir = tmp_path / "stopped"
    proc = subprocess.Popen(_command(workdir, data_dir, "--config.schedule.checkpoint_every=100"), cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    log = workdir / "metrics.jsonl"
    while not (log.exists() and log.stat().st_size) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # the first line is written after iteration 1, inside the loop's signal handling
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_by"] == "SIGTERM" and 1 <= summary["iteration"] < 6
    assert os.listdir(workdir / "checkpoints") == [f"iter_{summary['iteration']:07d}.pt"]
