"""Tests of gbn_jax/trainer/train_state.py: the state's spec on the mesh, and the start
of a run from nothing or from a checkpoint written by `checkpointing.save` (a tiny F1,
8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gbn_jax import models
from gbn_jax.trainer import checkpointing, steps, train_state

IMAGE_SHAPE = (2, 3, 1)
WIDTH, NUM_CLASSES = 4, 10


class FakeTrainIterator:
    """Records the data positions it is moved to."""

    def __init__(self):
        self.positions = []

    def set_state(self, position):
        self.positions.append(position)


@pytest.fixture(scope="module")
def setup(devices):
    """(mesh, model, tx, rng, spec, zero_accumulator)."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    model = models.get_model("f1", num_classes=NUM_CLASSES, width=WIDTH, num_hidden=1)
    tx = optax.sgd(0.1, momentum=0.9)
    rng = jax.random.PRNGKey(np.random.default_rng().integers(2**31))
    spec = train_state.spec(model, tx, IMAGE_SHAPE, rng, mesh)
    zero_accumulator = jax.jit(steps.zero_metrics, out_shardings=NamedSharding(mesh, P()))
    return mesh, model, tx, rng, spec, zero_accumulator


def as_numpy(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(
        jax.tree.leaves(as_numpy(actual)), jax.tree.leaves(as_numpy(expected)), strict=True
    ):
        np.testing.assert_array_equal(a, e)


def assert_replicated(tree, mesh):
    for leaf in jax.tree.leaves(tree):
        assert leaf.sharding == NamedSharding(mesh, P()), leaf.sharding


def perturbed(tree, rng):
    """`tree` with fresh random numbers added to its leaves."""
    return jax.tree.map(
        lambda x: (
            x + rng.standard_normal(x.shape).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x + rng.integers(1, 100, x.shape).astype(x.dtype)
        ),
        tree,
    )


# ------------------------------------------------------------------ spec


def test_spec_shapes_are_the_created_state_replicated(setup):
    mesh, model, tx, rng, spec, _ = setup
    flat = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    # Dense (kernel, bias), BatchNorm (scale, bias), classifier (kernel, bias).
    assert spec.num_params == flat * WIDTH + WIDTH + 2 * WIDTH + WIDTH * NUM_CLASSES + NUM_CLASSES
    created = steps.create_train_state(rng, model, tx, IMAGE_SHAPE)
    assert jax.tree.structure(spec.state) == jax.tree.structure(created)
    for shape, leaf in zip(jax.tree.leaves(spec.state), jax.tree.leaves(created), strict=True):
        assert (shape.shape, shape.dtype) == (leaf.shape, leaf.dtype)
    assert spec.state.step.shape == () and spec.state.step.dtype == jnp.int32
    metrics = ("loss", "accuracy", "grad_norm", "count", "learning_rate", "first_bad_step")
    assert sorted(spec.acc) == sorted(metrics)
    assert_replicated(spec.state, mesh)
    assert_replicated(spec.acc, mesh)


# ------------------------------------------------------------------ restore_or_create


def test_no_checkpoint_creates_the_step_zero_state(setup, tmp_path):
    mesh, model, tx, rng, spec, zero_accumulator = setup
    train_iter = FakeTrainIterator()
    manager = checkpointing.make_manager(str(tmp_path), keep=2)
    start = train_state.restore_or_create(manager, spec, train_iter, zero_accumulator)
    manager.close()
    assert (start.step, start.restored, train_iter.positions) == (0, False, [])
    assert_trees_equal(start.state, steps.create_train_state(rng, model, tx, IMAGE_SHAPE))
    assert_trees_equal(start.state.params0, start.state.params)
    assert_trees_equal(start.acc, steps.zero_metrics())
    assert_replicated(start.state, mesh)


@pytest.mark.parametrize("with_metrics", [True, False])
def test_restores_the_newest_checkpoint_and_its_data_position(setup, tmp_path, with_metrics):
    mesh, model, tx, rng, spec, zero_accumulator = setup
    np_rng = np.random.default_rng()
    created = steps.create_train_state(rng, model, tx, IMAGE_SHAPE)
    saved = {}
    manager = checkpointing.make_manager(str(tmp_path), keep=2)
    for step in (3, 7):
        state = perturbed(created, np_rng).replace(step=jnp.asarray(step, jnp.int32))
        acc = perturbed(steps.zero_metrics(), np_rng)
        position = {"epoch": int(np_rng.integers(5)), "step_in_epoch": int(np_rng.integers(50))}
        checkpointing.save(manager, step, state, position, acc if with_metrics else None)
        saved[step] = (state, acc, position)
    checkpointing.wait_until_finished(manager)
    manager.close()

    train_iter = FakeTrainIterator()
    manager = checkpointing.make_manager(str(tmp_path), keep=2)
    start = train_state.restore_or_create(manager, spec, train_iter, zero_accumulator)
    manager.close()
    state, acc, position = saved[7]
    assert (start.step, start.restored, train_iter.positions) == (7, True, [position])
    assert_trees_equal(start.state, state)
    assert_trees_equal(start.acc, acc if with_metrics else steps.zero_metrics())
    assert_replicated(start.state, mesh)
    assert_replicated(start.acc, mesh)
