"""Tests of gbn_jax.trainer.input_pipeline against independent numpy readings of the data."""

import gzip
import json
import os
import struct

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec

from gbn_jax.trainer import input_pipeline as ip
from gbn_jax.trainer.data import augment, iterators, sources

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST = ip.KNOWN_DATASETS["fashion_mnist"]


def parse_idx(path):
    """Own reader: struct-decoded big-endian header, then raw bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def sharding(devices):
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    return NamedSharding(mesh, PartitionSpec("data"))


@pytest.fixture(scope="module")
def fmnist():
    """Own parse of the Debian Fashion-MNIST files: {split: (images (N,28,28), labels)}."""
    return {
        split: (
            parse_idx(f"{FMNIST_DIR}/{prefix}-images-idx3-ubyte.gz"),
            parse_idx(f"{FMNIST_DIR}/{prefix}-labels-idx1-ubyte.gz"),
        )
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }


@pytest.fixture(scope="class")
def cifar_dir(tmp_path_factory):
    """Mock CIFAR-10 (192 examples per split), held open for one test class."""
    data_dir = str(tmp_path_factory.mktemp("cifar"))
    with tfds.testing.mock_data(num_examples=192):
        yield data_dir


def denormalize(images, spec):
    return (np.asarray(images) * np.asarray(spec.std) + np.asarray(spec.mean)) * 255.0


# ---------------------------------------------------------------- Fashion-MNIST, real files


def test_fashion_mnist_info(fmnist):
    info = ip.get_dataset_info("fashion_mnist")
    assert (info.num_train, info.num_eval, info.num_classes) == (60000, 10000, 10)
    assert info.image_shape == (28, 28, 1)
    assert np.array_equal(np.bincount(fmnist["train"][1]), np.full(10, 6000))
    assert np.array_equal(np.bincount(fmnist["test"][1]), np.full(10, 1000))


def test_fashion_mnist_normalization_constants_match_data(fmnist):
    counts = np.bincount(fmnist["train"][0].reshape(-1), minlength=256)
    values = np.arange(256) / 255.0
    mean = np.sum(counts * values) / counts.sum()
    std = np.sqrt(np.sum(counts * (values - mean) ** 2) / counts.sum())
    assert abs(mean - FMNIST.mean[0]) < 5e-4 and abs(std - FMNIST.std[0]) < 5e-4


def test_fashion_mnist_train_epoch_matches_idx(fmnist, sharding):
    images, labels = fmnist["train"]
    it = ip.create_train_iterator(
        "fashion_mnist", global_batch_size=6000, seed=3, sharding=sharding
    )
    assert it.steps_per_epoch == 10
    seen = []
    lo, hi = np.inf, -np.inf
    for step in range(10):
        indices = it.local_indices(0, step)
        batch = next(it)
        assert batch["image"].shape == (6000, 28, 28, 1) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        got = np.asarray(batch["image"])
        np.testing.assert_allclose(denormalize(got, FMNIST)[..., 0], images[indices], atol=1e-3)
        np.testing.assert_array_equal(np.asarray(batch["label"]), labels[indices])
        lo, hi = min(lo, got.min()), max(hi, got.max())
        seen.append(indices)
    # One epoch (60000 = 10 * 6000, nothing dropped) visits every example once.
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(60000))
    np.testing.assert_allclose(lo, (0 - FMNIST.mean[0]) / FMNIST.std[0], rtol=1e-6)
    np.testing.assert_allclose(hi, (1 - FMNIST.mean[0]) / FMNIST.std[0], rtol=1e-6)
    assert it.get_state()["epoch"] == 1 and it.get_state()["step_in_epoch"] == 0


def test_eval_accuracy_matches_numpy(fmnist, sharding):
    train_x, train_y = fmnist["train"]
    test_x, test_y = fmnist["test"]
    mean, std = FMNIST.mean[0], FMNIST.std[0]
    # A fixed nearest-class-mean classifier, built and applied in numpy.
    flat = (train_x.reshape(60000, -1) / 255.0 - mean) / std
    centroids = np.stack([flat[train_y == c].mean(0) for c in range(10)]).astype(np.float32)

    def predict(x):
        x = x.reshape(len(x), -1)
        return np.argmin((centroids**2).sum(-1) - 2 * x @ centroids.T, axis=1)

    expected = np.mean(predict(((test_x / 255.0 - mean) / std).astype(np.float32)) == test_y)
    ev = ip.create_eval_iterator("fashion_mnist", global_batch_size=3000, sharding=sharding)
    assert len(ev) == 4
    correct, count, labels = 0, 0, []
    for batch in ev:
        mask = np.asarray(batch["mask"])
        label = np.asarray(batch["label"])
        correct += np.sum((predict(np.asarray(batch["image"])) == label) & mask)
        count += mask.sum()
        labels.append(label[mask])
    assert count == 10000 and mask.sum() == 1000  # Last batch: 1000 real, 2000 padding.
    np.testing.assert_array_equal(np.concatenate(labels), test_y)
    assert expected > 0.5 and abs(correct / count - expected) < 1e-4


def test_mnist_from_idx_directory(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", 40), ("t10k", 24)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, (n,)))
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", arrays[prefix][0])
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", arrays[prefix][1])
    info = ip.get_dataset_info("mnist", data_dir=str(tmp_path))
    assert (info.num_train, info.num_eval, info.num_classes) == (40, 24, 10)
    images, labels = sources.load_arrays("mnist", "test", str(tmp_path))
    np.testing.assert_array_equal(images[..., 0], arrays["t10k"][0])
    np.testing.assert_array_equal(labels, arrays["t10k"][1])


# ---------------------------------------------------------------- augmentation


def crop_matches(out, image, pad=4):
    """All (dy, dx, flipped) with out == window of the zero-padded image (or its mirror)."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[dy : dy + height, dx : dx + width]
            found += [(dy, dx, False)] * np.array_equal(out, window)
            found += [(dy, dx, True)] * np.array_equal(out, window[:, ::-1])
    return found


def test_crop_flip_is_shifted_window_or_its_mirror():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (64, 8, 6, 3), dtype=np.uint8)
    out = np.asarray(jax.jit(augment.crop_flip)(images, jax.random.key(5)))
    assert out.shape == images.shape and out.dtype == np.uint8
    matches = [crop_matches(o, i) for o, i in zip(out, images, strict=True)]
    assert all(matches), "some row is not a window of the padded image or its mirror"
    flips = [m[0][2] for m in matches]
    assert 10 < sum(flips) < 54 and len({m[0][:2] for m in matches}) > 10


def test_host_crops_shapes():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert augment.random_resized_crop(image, rng).shape == (224, 224, 3)
    assert augment.resize_center_crop(image).shape == (224, 224, 3)
    flat = np.full((300, 400, 3), 77, np.uint8)  # Any crop of a flat image stays flat.
    assert np.all(augment.random_resized_crop(flat, rng) == 77)


# ---------------------------------------------------------------- CIFAR-10 mock: determinism


def take(it, n):
    return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def assert_same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def cifar_iter(data_dir, sharding, **overrides):
    kwargs = dict(global_batch_size=16, seed=7, sharding=sharding, data_dir=data_dir)
    return ip.create_train_iterator("cifar10", **{**kwargs, **overrides})


@pytest.fixture(scope="class")
def cifar_run(cifar_dir, sharding):
    """20 uninterrupted steps (12 per epoch) of mock CIFAR-10, batch 16, seed 7."""
    return take(cifar_iter(cifar_dir, sharding), 20)


class TestCifar10Mock:
    """The in-memory TFDS path on mock CIFAR-10, with crop/flip on the device."""

    def test_cifar_batches(self, cifar_dir, cifar_run, sharding):
        first = cifar_run[0]
        assert first["image"].shape == (16, 32, 32, 3) and first["image"].dtype == np.float32
        assert first["label"].dtype == np.int32 and np.all(
            (first["label"] >= 0) & (first["label"] < 10)
        )
        it = cifar_iter(cifar_dir, sharding)
        batch = next(it)
        assert batch["image"].sharding == sharding
        assert len(batch["image"].addressable_shards) == 8
        for shard in batch["image"].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), first["image"][shard.index])
        # Each augmented image is a pad-4 window of its source image (independent read).
        source = tfds.data_source("cifar10", split="train")
        raw = np.stack([source[int(i)]["image"] for i in it.local_indices(0, 0)])
        pixels = np.round(denormalize(first["image"], ip.KNOWN_DATASETS["cifar10"]))
        for got, image in zip(pixels.astype(np.uint8), raw, strict=True):
            assert crop_matches(got, image), "not a padded window of the source image"

    def test_same_seed_same_batches_different_seed_different(self, cifar_dir, cifar_run, sharding):
        again = cifar_iter(cifar_dir, sharding)
        assert_same(cifar_run[:3], take(again, 3))
        other = cifar_iter(cifar_dir, sharding, seed=8)
        assert not np.array_equal(take(other, 1)[0]["label"], cifar_run[0]["label"])
        # Every epoch is reshuffled.
        assert not np.array_equal(cifar_run[0]["label"], cifar_run[12]["label"])

    @pytest.mark.parametrize("stop", [5, 11, 12])  # Mid-epoch, last step of epoch, boundary.
    def test_resume_is_exact(self, cifar_dir, cifar_run, sharding, stop):
        it = cifar_iter(cifar_dir, sharding)
        take(it, stop)
        state = json.loads(json.dumps(it.get_state()))
        fresh = cifar_iter(cifar_dir, sharding)
        fresh.set_state(state)
        assert_same(cifar_run[stop : stop + 5], take(fresh, 5))

    def test_set_state_rejects_other_settings(self, cifar_dir, sharding):
        it = cifar_iter(cifar_dir, sharding)
        state = dict(it.get_state(), seed=9)
        with pytest.raises(ValueError, match="seed=9"):
            it.set_state(state)

    def test_simulated_processes_split_each_global_batch(self, cifar_dir, cifar_run, sharding):
        count, local = 4, 4
        per_process = []
        for p in range(count):
            it = cifar_iter(cifar_dir, sharding, process_index=p, process_count=count)
            indices = np.stack([it.local_indices(0, s) for s in range(it.steps_per_epoch)])
            per_process.append(indices)
            batches = take(it, 13)
            for step, batch in enumerate(batches):
                rows = slice(p * local, (p + 1) * local)
                np.testing.assert_array_equal(batch["image"], cifar_run[step]["image"][rows])
                np.testing.assert_array_equal(batch["label"], cifar_run[step]["label"][rows])
        # 192 examples = 12 steps * 16: the processes' shards are disjoint and cover the epoch.
        everything = np.concatenate([x.reshape(-1) for x in per_process])
        np.testing.assert_array_equal(np.sort(everything), np.arange(192))

    def test_cifar_eval_pads_last_batch(self, cifar_dir, sharding):
        ev = ip.create_eval_iterator(
            "cifar10", global_batch_size=40, sharding=sharding, data_dir=cifar_dir
        )
        batches = [jax.tree.map(np.asarray, b) for b in ev]
        assert len(batches) == len(ev) == 5
        masks = np.concatenate([b["mask"] for b in batches])
        assert masks.sum() == 192 and not masks[192:].any()
        images = np.concatenate([b["image"] for b in batches])[masks]
        source = tfds.data_source("cifar10", split="test")
        raw = np.stack([source[i]["image"] for i in range(192)])
        np.testing.assert_allclose(
            denormalize(images, ip.KNOWN_DATASETS["cifar10"]), raw, atol=1e-3
        )


def test_fashion_mnist_four_process_coverage():
    shards = []
    for p in range(4):
        it = ip.create_train_iterator(
            "fashion_mnist", global_batch_size=4000, seed=1, process_index=p, process_count=4
        )
        shards.append(np.concatenate([it.local_indices(2, s) for s in range(15)]))
        assert all(len(it.local_indices(2, s)) == 1000 for s in range(15))
    assert all(len(set(shards[a]) & set(shards[b])) == 0 for a in range(4) for b in range(a))
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(60000))


# ---------------------------------------------------------------- ImageNet mock (grain path)


def test_imagenet_grain_path(tmp_path, sharding):
    with tfds.testing.mock_data(num_examples=20):
        info = ip.get_dataset_info("imagenet2012", data_dir=str(tmp_path))
        assert info.image_shape == (224, 224, 3) and info.num_classes == 1000
        kwargs = dict(
            global_batch_size=8, seed=0, sharding=sharding, data_dir=str(tmp_path), num_threads=2
        )
        it = ip.create_train_iterator("imagenet2012", **kwargs)
        assert it.steps_per_epoch == 2
        run = take(it, 3)  # Crosses the epoch boundary.
        assert run[0]["image"].shape == (8, 224, 224, 3) and run[0]["image"].dtype == np.float32
        assert run[0]["label"].dtype == np.int32
        fresh = ip.create_train_iterator("imagenet2012", **kwargs)
        fresh.set_state(json.loads(json.dumps(it.get_state())))
        it_next = take(it, 2)
        assert_same(it_next, take(fresh, 2))
        assert_same(run, take(ip.create_train_iterator("imagenet2012", **kwargs), 3))

        ev = ip.create_eval_iterator(
            "imagenet2012",
            global_batch_size=8,
            sharding=sharding,
            data_dir=str(tmp_path),
            num_threads=2,
        )
        batches = [jax.tree.map(np.asarray, b) for b in ev]
        assert [b["mask"].sum() for b in batches] == [8, 8, 4]
        assert batches[0]["image"].shape == (8, 224, 224, 3)


# ---------------------------------------------------------------- errors


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(
        ip.DatasetNotFoundError, match="tfds build cifar10 --file_format=array_record"
    ):
        ip.create_train_iterator("cifar10", global_batch_size=8, seed=0, data_dir=str(tmp_path))
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(ip.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        ip.get_dataset_info("fashion_mnist", data_dir=str(tmp_path))
    assert issubclass(ip.DatasetNotFoundError, FileNotFoundError)
    assert issubclass(ip.DatasetNotFoundError, ValueError)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="no_such_dataset_xyz") as err:
        ip.get_dataset_info("no_such_dataset_xyz")
    assert not isinstance(err.value, ip.DatasetNotFoundError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(global_batch_size=4004), "divisible by the 8 devices"),
        (dict(global_batch_size=4000, process_count=3, process_index=0), "process_count=3"),
        (dict(global_batch_size=0), "global_batch_size=0"),
        (dict(global_batch_size=80000), "larger than the 60000"),
        (dict(global_batch_size=4000, seed=-1), "seed=-1"),
        (dict(global_batch_size=4000, process_count=4, process_index=4), "index=4"),
    ],
)
def test_bad_batch_layout(kwargs, message):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        ip.create_train_iterator("fashion_mnist", **kwargs)


def test_debian_files_are_used_when_present():
    assert os.path.isdir(FMNIST_DIR)
    assert ip.get_dataset_info("fashion_mnist").source == f"idx:{FMNIST_DIR}"


# ---------------------------------------------------------------- the authors' protocol


def test_authors_input_is_pad2_crop28_flip_and_half_normalization(fmnist, sharding):
    images, _ = fmnist["train"]
    it = ip.create_train_iterator(
        "fashion_mnist", global_batch_size=256, seed=11, sharding=sharding, augment="authors"
    )
    indices = it.local_indices(0, 0)
    got = np.asarray(next(it)["image"])[..., 0]
    # torchvision ToTensor + Normalize(0.5, 0.5): x = (p / 255 - 0.5) / 0.5.
    pixels = (got * 0.5 + 0.5) * 255.0
    assert np.abs(pixels - np.round(pixels)).max() < 1e-3
    pixels = np.round(pixels).astype(np.uint8)
    matches = [
        crop_matches(o[..., None], images[i][..., None], pad=2)
        for o, i in zip(pixels, indices, strict=True)
    ]
    assert all(matches), "some image is not a 28x28 window of the 2-padded image or its mirror"
    # Every offset in [0, 4]^2 turns up, and about half the images are flipped (a
    # symmetric image can match both ways: count the first match).
    offsets = {m[0][:2] for m in matches}
    assert len(offsets) == 25
    assert 90 < sum(m[0][2] for m in matches) < 166


def test_crop_flip_pads_with_the_fill_value():
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (64, 6, 6, 3), dtype=np.uint8)
    out = np.asarray(augment.crop_flip(images, jax.random.key(1), pad=4, fill=127))
    for o, image in zip(out, images, strict=True):
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), constant_values=127)
        windows = [padded[dy : dy + 6, dx : dx + 6] for dy in range(9) for dx in range(9)]
        assert any(np.array_equal(o, w) or np.array_equal(o, w[:, ::-1]) for w in windows)
    assert np.any(out == 127)


def test_authors_spec_by_dataset():
    cifar = sources.authors_spec(sources.KNOWN_DATASETS["cifar10"])
    assert (cifar.pad, cifar.fill, cifar.mean) == (4, 127, sources.IMAGENET_MEAN)
    mnist = sources.authors_spec(sources.KNOWN_DATASETS["mnist"])
    assert (mnist.pad, mnist.mean, mnist.std, mnist.augmentation) == (
        2,
        (0.5,),
        (0.5,),
        "crop_flip",
    )
    with pytest.raises(ValueError, match="imagenet2012"):
        sources.authors_spec(sources.KNOWN_DATASETS["imagenet2012"])
    with pytest.raises(ValueError, match="augment"):
        ip.create_train_iterator("fashion_mnist", global_batch_size=8, seed=0, augment="torch")


def _chunks_reference(positions, batch, groups):
    """torch.chunk(batch, groups) by its definition: chunks of ceil(n / groups) rows."""
    n = len(positions)
    size = -(-n // groups)
    slots = np.full(batch, -1)
    for j, start in enumerate(range(0, n, size)):
        chunk = positions[start : start + size]
        slots[j * (batch // groups) : j * (batch // groups) + len(chunk)] = chunk
    return slots


@pytest.mark.parametrize(
    ("n", "batch", "groups"), [(2656, 4096, 32), (608, 2048, 1), (97, 128, 8), (5, 64, 8)]
)
def test_partial_batch_slots_follow_torch_chunk(n, batch, groups):
    positions = np.random.default_rng(n).permutation(10 * batch)[:n]
    slots = iterators.partial_batch_slots(positions, batch, groups)
    np.testing.assert_array_equal(slots, _chunks_reference(positions, batch, groups))
    full = np.arange(batch)
    np.testing.assert_array_equal(iterators.partial_batch_slots(full, batch, groups), full)
    with pytest.raises(ValueError, match="groups"):
        iterators.partial_batch_slots(positions, batch, 3)


def test_keep_last_batch_trains_every_example_once_per_epoch(fmnist, sharding):
    images, labels = fmnist["train"]
    it = ip.create_train_iterator(
        "fashion_mnist",
        global_batch_size=4096,
        seed=5,
        sharding=sharding,
        keep_last_batch=True,
        batch_groups=32,
    )
    assert it.steps_per_epoch == 15  # 14 full batches and 2656 = 60000 - 14 * 4096
    seen = []
    for step in range(15):
        slots = it.local_indices(0, step)
        batch = jax.tree.map(np.asarray, next(it))
        real = batch["mask"]
        np.testing.assert_array_equal(real, slots >= 0)
        np.testing.assert_allclose(
            denormalize(batch["image"][real], FMNIST)[..., 0], images[slots[real]], atol=1e-3
        )
        np.testing.assert_array_equal(batch["label"][real], labels[slots[real]])
        if not real.all():  # Padding rows hold the normalization of zero pixels.
            padding = denormalize(batch["image"][~real], FMNIST)
            np.testing.assert_allclose(padding, 0.0, atol=1e-3)
        seen.append(slots[real])
    assert [len(s) for s in seen] == [4096] * 14 + [2656]
    # The partial batch: 32 chunks of 83 examples, each at the start of a ghost batch.
    np.testing.assert_array_equal(real.reshape(32, 128).sum(1), np.full(32, 83))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(60000))
    # A restored iterator at the partial batch yields it again.
    resumed = ip.create_train_iterator(
        "fashion_mnist",
        global_batch_size=4096,
        seed=5,
        sharding=sharding,
        keep_last_batch=True,
        batch_groups=32,
    )
    resumed.set_state({**it.get_state(), "epoch": 0, "step_in_epoch": 14})
    np.testing.assert_array_equal(np.asarray(next(resumed)["mask"]), real)
    assert it.get_state()["epoch"] == 1 and it.get_state()["step_in_epoch"] == 0


def test_validation_split_is_held_out_of_training(fmnist, sharding):
    images, labels = fmnist["train"]
    held = sources.holdout_indices(60_000, 10_000)
    assert len(held) == len(np.unique(held)) == 10_000
    np.testing.assert_array_equal(held, sources.holdout_indices(60_000, 10_000))  # fixed
    rest = np.setdiff1d(np.arange(60_000), held)
    train_images, train_labels = sources.load_arrays("fashion_mnist", "train", None, 10_000)
    val_images, val_labels = sources.load_arrays("fashion_mnist", "holdout", None, 10_000)
    np.testing.assert_array_equal(val_images[..., 0], images[held])
    np.testing.assert_array_equal(val_labels, labels[held])
    np.testing.assert_array_equal(train_images[..., 0], images[rest])
    np.testing.assert_array_equal(train_labels, labels[rest])
    # Roughly stratified by chance: every class has 800-1200 of the 10,000.
    assert np.all(np.abs(np.bincount(val_labels, minlength=10) - 1000) < 200)
    it = ip.create_train_iterator(
        "fashion_mnist", global_batch_size=5000, seed=1, sharding=sharding, validation_size=10_000
    )
    assert it.steps_per_epoch == 10 and it.num_examples == 50_000
    evals = ip.create_eval_iterator(
        "fashion_mnist",
        global_batch_size=1000,
        sharding=sharding,
        split="holdout",
        validation_size=10_000,
    )
    got = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"])] for b in evals])
    np.testing.assert_array_equal(got, labels[held])
    for bad in (0, 60_000, -5):
        with pytest.raises(ValueError, match="validation_size"):
            sources.holdout_indices(60_000, bad)
    with pytest.raises(ValueError, match="holdout"):
        sources.load_arrays("fashion_mnist", "holdout", None, 0)


def test_fashion_mnist_32_frames_every_image_in_black(fmnist, sharding):
    """The 32x32 variant (for CIFAR models): each image of the own IDX parse with two
    black pixels around it, the same held-out validation examples, and the same batches
    as fashion_mnist with the border at the normalized value of a black pixel."""
    images, labels = fmnist["train"]
    held = sources.holdout_indices(60_000, 10_000)
    val_images, val_labels = sources.load_arrays("fashion_mnist_32", "holdout", None, 10_000)
    assert val_images.shape == (10_000, 32, 32, 1) and not val_images.flags.writeable
    np.testing.assert_array_equal(
        val_images[..., 0], np.pad(images[held], ((0, 0), (2, 2), (2, 2)))
    )
    np.testing.assert_array_equal(val_labels, labels[held])
    test_images, _ = sources.load_arrays("fashion_mnist_32", "test")
    np.testing.assert_array_equal(test_images[:, 2:30, 2:30, 0], fmnist["test"][0])
    assert test_images[:, :2].max() == test_images[:, 30:].max() == 0
    assert test_images[:, :, :2].max() == test_images[:, :, 30:].max() == 0
    info = ip.get_dataset_info("fashion_mnist_32")
    assert (info.image_shape, info.num_train, info.num_eval) == ((32, 32, 1), 60_000, 10_000)
    kwargs = dict(global_batch_size=512, seed=5, sharding=sharding, validation_size=10_000)
    framed = take(ip.create_train_iterator("fashion_mnist_32", **kwargs), 2)
    plain = take(ip.create_train_iterator("fashion_mnist", **kwargs), 2)
    black = (0.0 - FMNIST.mean[0]) / FMNIST.std[0]
    for f, p in zip(framed, plain, strict=True):
        assert f["image"].shape == (512, 32, 32, 1)
        np.testing.assert_array_equal(f["image"][:, 2:30, 2:30], p["image"])
        np.testing.assert_allclose(f["image"][:, :2], black, rtol=1e-6)
        np.testing.assert_array_equal(f["label"], p["label"])
