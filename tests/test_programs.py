"""Tests of gbn_jax/trainer/programs.py (and the inputs of gbn_jax/trainer/inputs.py) on a
tiny F1 over mock CIFAR-10, 8 fake CPU devices."""

import importlib.util
import os

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gbn_jax import models
from gbn_jax.trainer import inputs as inputs_lib
from gbn_jax.trainer import programs as programs_lib
from gbn_jax.trainer import steps
from gbn_jax.trainer.records import finish_evaluation, start_evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 3  # rows of a chunk


def load_config(overrides):
    path = os.path.join(ROOT, "configs", "cifar10_c1.py")
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("lb_lr_gbn,batch=64,ghost=8")
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def built(tmp_path_factory, devices):
    """(config, mesh, resident inputs, streamed inputs, model, programs)."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    with tfds.testing.mock_data(num_examples=160):
        config = load_config({"eval_batch_size": 64, "data_dir": data_dir})
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        resident = inputs_lib.create(config, mesh)
        config.device_resident_data = False
        streamed = inputs_lib.create(config, mesh)
        model = models.get_model(
            "f1", num_classes=10, norm="ghost", ghost_batch_size=8, width=32, num_hidden=2
        )
        tx = optax.sgd(0.1, momentum=0.9)
        init_fn = lambda rng: steps.create_train_state(rng, model, tx, (32, 32, 3))
        abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
        replicated = NamedSharding(mesh, P())
        every = lambda tree: jax.tree.map(lambda _: replicated, tree)
        programs = programs_lib.build(
            model=model,
            tx=tx,
            learning_rate=optax.constant_schedule(0.1),
            mesh=mesh,
            state_shapes=programs_lib.with_shardings(abstract_state, every(abstract_state)),
            acc_shapes=programs_lib.with_shardings(
                jax.eval_shape(steps.zero_metrics), every(jax.eval_shape(steps.zero_metrics))
            ),
            train_feed=resident.train_feed,
            eval_feeds=resident.eval_feeds,
            loop_steps=K,
            dropout_rng=jax.random.key(1),
            compiler_options={},
            device_loop=False,
            noise_small_batch=8,
        )
        state = jax.jit(init_fn, out_shardings=every(abstract_state))(jax.random.key(0))
        yield resident, streamed, programs, state


def test_inputs(built):
    resident, streamed, _, _ = built
    assert resident.resident and not streamed.resident
    assert list(resident.eval_feeds) == list(resident.eval_splits) == ["eval"]
    assert streamed.eval_feeds == {}


def test_train_chunk_and_weight_distance_against_numpy(built):
    resident, _, programs, state = built
    assert float(programs.weight_distance(state)) == 0.0
    acc = programs.zero_accumulator()
    assert jax.tree.map(np.asarray, acc) == jax.tree.map(np.asarray, steps.zero_metrics())
    feed = resident.train_feed
    state = jax.tree.map(lambda x: x.copy(), state)  # the chunk donates its state
    state, acc, step = programs.train_chunk(state, acc, feed.arrays, feed.next_chunk(2, K), 2)
    assert int(step) == 2 and int(acc["count"]) == 2
    params, params0 = jax.device_get((state.params, state.params0))
    squares = [
        np.sum((np.asarray(p, np.float64) - np.asarray(p0, np.float64)) ** 2)
        for p, p0 in zip(jax.tree.leaves(params), jax.tree.leaves(params0), strict=True)
    ]
    distance = float(programs.weight_distance(state))
    assert distance > 0
    assert distance == pytest.approx(np.sqrt(sum(squares)), rel=1e-5)


def test_resident_and_host_fed_evaluations_agree(built):
    resident, streamed, programs, state = built
    on_devices = finish_evaluation(start_evaluation(state, programs, resident.eval_splits))
    from_host = finish_evaluation(start_evaluation(state, programs, streamed.eval_splits))
    assert on_devices.keys() == {"eval_loss", "eval_accuracy"}
    assert on_devices["eval_accuracy"] == pytest.approx(from_host["eval_accuracy"], abs=1e-6)
    assert on_devices["eval_loss"] == pytest.approx(from_host["eval_loss"], rel=1e-5)
    # Evaluation reads the state and leaves it as it was.
    assert float(programs.weight_distance(state)) == 0.0


def test_noise_scale_measurement(built):
    resident, _, programs, state = built
    feed = resident.train_feed
    metrics = jax.device_get(programs.noise_scale(state, feed.arrays, feed.next_chunk(1, K)))
    assert set(metrics) == {
        "noise_sq_norm_small",
        "noise_sq_norm_big",
        "noise_grad_sq",
        "noise_trace_sigma",
        "noise_b_simple",
    }
    assert metrics["noise_sq_norm_small"] > metrics["noise_sq_norm_big"] > 0
    ratio = metrics["noise_trace_sigma"] / metrics["noise_grad_sq"]
    assert metrics["noise_b_simple"] == pytest.approx(ratio, rel=1e-6)
