"""The batch pipeline: 8-device layout, determinism, resume, host sharding, stream and dataset backgrounds,
workers."""
import jax
import numpy as np
import pytest

from image_reference import np_bilinear
from insloc_jax.data import augment_jax, pipeline, sources

CANVAS = 64
NUM_TRAIN = 48


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("synthetic"))
    return {"kind": "synthetic", "data_dir": data_dir, "image_size": 40, "num_train": NUM_TRAIN,
            "num_test": 8, "num_classes": 4}


def _pipe(spec, **kwargs):
    args = dict(source=spec, canvas_size=CANVAS, fg_size_range=(24, 48), moco_size=32, stream_group=8,
                per_device_batch=1, local_devices=8, seed=3)
    args.update(kwargs)
    return pipeline.make_pipeline(**args)


def _take(batches, count):
    return [next(batches) for _ in range(count)]


def _assert_equal_batches(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_layout_on_eight_devices(spec):
    devices = jax.local_device_count()
    assert devices == 8
    batch = next(_pipe(spec, per_device_batch=2, local_devices=devices, augment_on="host"))
    shapes = {k: (v.shape, v.dtype.name) for k, v in batch.items()}
    assert shapes == {
        "image1": ((8, 2, CANVAS, CANVAS, 3), "float32"), "image2": ((8, 2, CANVAS, CANVAS, 3), "float32"),
        "boxes1": ((8, 2, 4), "float32"), "boxes2": ((8, 2, 4), "float32"),
        "index": ((8, 2), "int64"), "position": ((8, 2), "int64")}
    np.testing.assert_array_equal(batch["position"], np.arange(16).reshape(8, 2))
    for key in ("boxes1", "boxes2"):
        assert (batch[key] >= 0).all() and (batch[key] <= CANVAS).all()
    # Normalised pixels: raw 0..255 maps to about [-2.2, 2.7].
    assert -2.2 <= batch["image1"].min() < -1.0 and 1.0 < batch["image1"].max() <= 2.7


def test_moco_and_device_modes_layout(spec):
    moco = next(_pipe(spec, mode="moco"))
    assert moco["image1"].shape == (8, 1, 32, 32, 3)
    np.testing.assert_array_equal(moco["boxes2"], np.broadcast_to([0, 0, 32, 32], (8, 1, 4)))
    dev = next(_pipe(spec))  # augment_on="device" is the default
    assert dev["image1"].dtype == np.uint8 and dev["aug2_order"].shape == (8, 1, 4)
    assert dev["aug1_sigma"].shape == (8, 1) and dev["aug1_apply"].dtype == bool


@pytest.mark.parametrize("kwargs", [{"stream_group": 16},
                                    {"background_mode": "dataset", "augment_on": "host"},
                                    {"mode": "moco"}])
def test_deterministic_and_resumes_with_next_batch(spec, kwargs):
    # Batch 8 per step, 48 images: steps 5..7 cross the first epoch boundary (position 48); step 5 starts
    # mid stream group (40 % 16 = 8).
    full = _take(_pipe(spec, **kwargs), 8)
    again = _take(_pipe(spec, **kwargs), 2)
    resumed = _take(_pipe(spec, start_step=5, **kwargs), 3)
    for a, b in zip(full[:2], again):
        _assert_equal_batches(a, b)
    for a, b in zip(full[5:], resumed):
        _assert_equal_batches(a, b)
    other_seed = next(_pipe(spec, seed=4, **kwargs))
    assert not np.array_equal(other_seed["image1"], full[0]["image1"])


def test_each_epoch_is_a_permutation_and_hosts_are_disjoint(spec):
    batches = _pipe(spec, mode="moco")
    assert batches.steps_per_epoch == NUM_TRAIN // 8
    one = np.concatenate([b["index"].ravel() for b in _take(batches, 12)])
    assert sorted(one[:NUM_TRAIN]) == list(range(NUM_TRAIN))
    assert sorted(one[NUM_TRAIN:]) == list(range(NUM_TRAIN))
    assert not np.array_equal(one[:NUM_TRAIN], one[NUM_TRAIN:])  # reshuffled per epoch
    hosts = [np.concatenate([b["index"].ravel() for b in _take(
        _pipe(spec, mode="moco", process_index=p, process_count=2), 3)]) for p in range(2)]
    assert sorted(np.concatenate(hosts)) == list(range(NUM_TRAIN))


def test_stream_backgrounds_are_other_images_of_the_group(spec):
    images = {int(e["index"]): e["image"] for e in sources.examples(sources.open_source(spec))}
    batch = next(_pipe(spec, augment_on="device"))  # 8 samples = one stream group of 8
    index = batch["index"].ravel()
    for view in (1, 2):
        composites = batch[f"image{view}"].reshape(8, CANVAS, CANVAS, 3)
        for k, box in enumerate(batch[f"boxes{view}"].reshape(8, 4).astype(int)):
            outside = np.ones((CANVAS, CANVAS), bool)
            outside[box[1]:box[3], box[0]:box[2]] = False
            errors = {int(i): np.abs(composites[k][outside] - np_bilinear(images[int(i)], CANVAS, CANVAS)[outside]).max()
                      for i in index}
            matches = [i for i, e in errors.items() if e <= 1.01]
            assert matches and index[k] not in matches, (k, errors)


def _background_sources(composites, boxes, references):
    """For each composite [N, S, S, 3] with its pasted box [N, 4], the reference images (a dict index ->
    [S, S, 3] resized image) whose pixels outside the box it shows, to bilinear rounding."""
    found = []
    for image, box in zip(composites, boxes.astype(int)):
        outside = np.ones(image.shape[:2], bool)
        outside[box[1]:box[3], box[0]:box[2]] = False
        found.append({i for i, ref in references.items() if np.abs(image[outside] - ref[outside]).max() <= 1.01})
    return found


def test_dataset_backgrounds_are_random_images_of_the_whole_dataset_one_per_view(spec):
    # The original's rule: each view is pasted on an image drawn from the whole dataset, independently per
    # view (the stream mode instead lends backgrounds within the batch's group).
    references = {int(e["index"]): np_bilinear(e["image"], CANVAS, CANVAS)
                  for e in sources.examples(sources.open_source(spec))}
    batch = next(_pipe(spec, background_mode="dataset", per_device_batch=2))
    own = set(batch["index"].ravel().tolist())
    found = [_background_sources(batch[f"image{v}"].reshape(16, CANVAS, CANVAS, 3),
                                 batch[f"boxes{v}"].reshape(16, 4), references) for v in (1, 2)]
    assert all(len(f) >= 1 for view in found for f in view)  # every background is a dataset image
    backgrounds = [min(f) for view in found for f in view]
    assert len(set(backgrounds) - own) > 8  # 32 draws from 48 images, most of them outside the batch
    assert sum(a == b for a, b in zip(*[[min(f) for f in view] for view in found])) < 4  # views differ


def test_device_augmentation_equals_host_augmentation(spec):
    host = next(_pipe(spec, augment_on="host"))
    device = next(_pipe(spec, augment_on="device"))
    step = jax.jit(augment_jax.augment_views, static_argnums=1)
    for view in (1, 2):
        images, boxes = step(device, view)
        np.testing.assert_allclose(np.asarray(images), host[f"image{view}"], atol=1e-4)
        np.testing.assert_array_equal(np.asarray(boxes), host[f"boxes{view}"])


@pytest.mark.parametrize("kwargs", [{"mode": "moco"}, {"background_mode": "dataset"}, {"stream_group": 4}])
def test_global_batch_does_not_depend_on_the_number_of_processes(spec, kwargs):
    # Two processes of 4 devices each make the same global batches, in device order, as one of 8.
    one = _take(_pipe(spec, per_device_batch=2, **kwargs), 4)
    two = [_take(_pipe(spec, per_device_batch=2, local_devices=4, process_index=p, process_count=2, **kwargs), 4)
           for p in range(2)]
    for step, whole in enumerate(one):
        for key in whole:
            joined = np.concatenate([two[0][step][key], two[1][step][key]])
            np.testing.assert_array_equal(joined, whole[key], err_msg=f"step {step} {key}")


def test_stream_groups_must_fit_the_per_host_batch_on_several_processes(spec):
    with pytest.raises(ValueError, match="multiple of data.stream_group"):
        _pipe(spec, per_device_batch=1, local_devices=4, process_count=2, stream_group=16)


def test_worker_processes_make_the_same_batches(spec):
    # Grain's worker processes (spawned, each with its own copy of the source) change nothing in the batches.
    inline = _take(_pipe(spec, augment_on="host", stream_group=16), 3)
    workers = _take(_pipe(spec, augment_on="host", stream_group=16, num_workers=2), 3)
    for a, b in zip(inline, workers):
        _assert_equal_batches(a, b)
