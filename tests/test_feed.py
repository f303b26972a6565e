"""Tests of gbn_jax/trainer/data/feed.py: the batches built on the devices, inside a jitted loop,
equal bit for bit those the host iterators of gbn_jax.trainer.input_pipeline yield (8 fake CPU
devices)."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec

from gbn_jax.trainer import input_pipeline as ip
from gbn_jax.trainer.data import feed


@pytest.fixture(scope="module")
def mesh(devices):
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """Mock CIFAR-10 (192 examples per split: 12 steps of 16 per epoch)."""
    data_dir = str(tmp_path_factory.mktemp("cifar"))
    with tfds.testing.mock_data(num_examples=192):
        yield data_dir


def chunk_batches(train_feed, num_steps, length):
    """The batches of the feed's next chunk, built by `batch` inside one jitted scan."""
    xs = train_feed.next_chunk(num_steps, length)
    assert jax.tree.leaves(xs)[0].shape[0] == length
    built = jax.jit(lambda arrays, xs: jax.lax.map(lambda x: train_feed.batch(arrays, x), xs))
    batches = jax.device_get(built(train_feed.arrays, xs))
    return [jax.tree.map(lambda a, i=i: a[i], batches) for i in range(num_steps)]


def assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a["image"].dtype == np.float32 and a["label"].dtype == np.int32
        np.testing.assert_array_equal(a["image"], np.asarray(b["image"]))
        np.testing.assert_array_equal(a["label"], np.asarray(b["label"]))


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
def test_cifar_chunks_equal_iterator_batches(cifar_dir, mesh, resident):
    """Crop/flip keyed by the step, chunks of several lengths, across an epoch boundary."""
    kwargs = dict(
        global_batch_size=16,
        seed=7,
        sharding=NamedSharding(mesh, PartitionSpec("data")),
        data_dir=cifar_dir,
    )
    reference = ip.create_train_iterator("cifar10", **kwargs)
    expected = [next(reference) for _ in range(16)]
    train_feed = feed.TrainFeed(
        ip.create_train_iterator("cifar10", **kwargs), mesh, resident=resident
    )
    assert train_feed.resident == resident and bool(train_feed.arrays) == resident
    got = []
    for num_steps in (1, 5, 4, 6):  # Steps 0-15: the 12-step epoch ends inside the third.
        got += chunk_batches(train_feed, num_steps, length=6)
    assert_same(got, expected)
    assert train_feed.iterator.get_state()["epoch"] == 1
    assert train_feed.iterator.get_state()["step_in_epoch"] == 4
    # Padding rows of a short chunk are zeros (never read by the loop).
    xs = jax.device_get(train_feed.next_chunk(2, 6))
    assert xs["step"].tolist() == [16, 17, 0, 0, 0, 0]
    padding = xs["index"][2:] if resident else xs["image"][2:]
    assert not padding.any()


def test_fashion_mnist_resume_position_moves_the_feed(mesh):
    """A feed whose iterator is set to a saved position continues it (resident)."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    kwargs = dict(global_batch_size=512, seed=3, sharding=sharding)
    reference = ip.create_train_iterator("fashion_mnist", **kwargs)
    reference.set_state(dict(reference.get_state(), step_in_epoch=115))
    expected = [next(reference) for _ in range(4)]  # 117 steps per epoch: crosses into 1.
    train_feed = feed.TrainFeed(
        ip.create_train_iterator("fashion_mnist", **kwargs), mesh, resident=True
    )
    train_feed.iterator.set_state(dict(train_feed.iterator.get_state(), step_in_epoch=115))
    assert_same(chunk_batches(train_feed, 4, length=4), expected)
    assert train_feed.arrays["image"].sharding.is_fully_replicated
    assert train_feed.arrays["image"].dtype == np.uint8


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
def test_authors_protocol_chunks_equal_iterator_batches(mesh, resident):
    """The authors' input (pad 2, crop 28, flip), a held-out validation split and the
    partial last batch kept (masked, laid out as torch.chunk over 3 ghost batches)."""
    kwargs = dict(
        global_batch_size=96,
        seed=5,
        sharding=NamedSharding(mesh, PartitionSpec("data")),
        augment="authors",
        validation_size=59_000,
        keep_last_batch=True,
        batch_groups=3,
    )
    reference = ip.create_train_iterator("fashion_mnist", **kwargs)
    assert reference.steps_per_epoch == 11  # 1,000 = 10 x 96 + 40
    expected = [next(reference) for _ in range(13)]
    train_feed = feed.TrainFeed(
        ip.create_train_iterator("fashion_mnist", **kwargs), mesh, resident=resident
    )
    got = chunk_batches(train_feed, 6, length=6) + chunk_batches(train_feed, 6, length=6)
    got += chunk_batches(train_feed, 1, length=6)
    assert_same(got, expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a["mask"], np.asarray(b["mask"]))
    assert got[10]["mask"].sum() == 40 and got[9]["mask"].all()


def test_eval_pass_equals_eval_iterator(cifar_dir, mesh):
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    ev = ip.create_eval_iterator(
        "cifar10", global_batch_size=40, sharding=sharding, data_dir=cifar_dir
    )
    eval_feed = feed.EvalFeed(ev, mesh)
    assert eval_feed.num_examples == 192 and eval_feed.xs["index"].shape == (5, 40)
    built = jax.jit(lambda arrays, xs: jax.lax.map(lambda x: eval_feed.batch(arrays, x), xs))
    batches = jax.device_get(built(eval_feed.arrays, eval_feed.xs))
    for i, expected in enumerate(ev):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(batches[key][i], np.asarray(expected[key]), err_msg=key)
    assert batches["mask"].sum() == 192 and not batches["mask"][-1, 32:].any()


def test_streamed_dataset_cannot_be_resident(tmp_path, mesh):
    with tfds.testing.mock_data(num_examples=20):
        it = ip.create_train_iterator(
            "imagenet2012", global_batch_size=8, seed=0, data_dir=str(tmp_path), num_threads=2
        )
        with pytest.raises(ValueError, match="cannot be device-resident"):
            feed.TrainFeed(it, mesh, resident=True)
        streamed = feed.TrainFeed(it, mesh, resident=False)
        # 8 x 224 x 224 x 3 bytes a step: a chunk stays under STREAMED_CHUNK_BYTES.
        assert streamed.max_steps_per_loop == feed.STREAMED_CHUNK_BYTES // (8 * 224 * 224 * 3)
        assert feed.split_bytes(it) == 0


def test_resident_budget_is_a_fraction_of_memory(devices):
    budget = feed.resident_budget(devices)
    # CPU: a quarter of the host's memory shared by the 8 fake devices.
    assert 0 < budget < 2**40
    assert feed.split_bytes(ip.create_eval_iterator("fashion_mnist", global_batch_size=8)) == (
        10_000 * 28 * 28 + 10_000 * 4
    )
