"""Tests of gbn_jax.trainer.noise_scale against a linear-regression noise scale in numpy.

For the loss 1/2 (x_i . w - y_i)^2 the per-example gradients are g_i = (x_i . w - y_i)
x_i, so the true |G|^2 and tr(Sigma) of a dataset follow from them in numpy, without
the code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gbn_jax import models
from gbn_jax.research import sharpness
from gbn_jax.trainer import noise_scale


def _regression(rng: np.random.Generator, n: int, d: int):
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d)
    w_true = rng.standard_normal(d)
    y = x @ w_true + 0.7 * rng.standard_normal(n)
    w = w_true + 0.5 * rng.standard_normal(d)  # away from the optimum: |G| > 0
    return x, y, w


def _per_example_grads(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (x @ w - y)[:, None] * x


def _regression_loss(params, batch):
    residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
    return 0.5 * jnp.mean(residual**2)


def _true_noise(grads: np.ndarray) -> tuple[float, float]:
    """|G|^2 and tr(Sigma) of the per-example gradients (population covariance)."""
    mean = grads.mean(0)
    return float(mean @ mean), float(np.sum(grads.var(0)))


def test_estimate_recovers_true_values_from_expected_norms():
    rng = np.random.default_rng(1)
    x, y, w = _regression(rng, 500, 7)
    grad_sq, trace = _true_noise(_per_example_grads(x, y, w))
    # E|G_B|^2 = |G|^2 + tr(Sigma) / B for B examples drawn independently.
    small, big = 16, 256
    est = noise_scale.estimate_from_norms(
        grad_sq + trace / small, grad_sq + trace / big, small, big
    )
    np.testing.assert_allclose(est.grad_sq, grad_sq, rtol=1e-10)
    np.testing.assert_allclose(est.trace_sigma, trace, rtol=1e-10)
    assert noise_scale.simple_noise_scale(est.trace_sigma, est.grad_sq) == pytest.approx(
        trace / grad_sq, rel=1e-10
    )


def test_estimate_is_unbiased_over_random_batches():
    rng = np.random.default_rng(2)
    x, y, w = _regression(rng, 400, 5)
    grads = _per_example_grads(x, y, w)
    grad_sq, trace = _true_noise(grads)
    small, big, draws = 8, 64, 20_000
    idx_small = rng.integers(0, len(grads), (draws, small))
    idx_big = rng.integers(0, len(grads), (draws, big))
    sq_small = np.sum(grads[idx_small].mean(1) ** 2, axis=-1)
    sq_big = np.sum(grads[idx_big].mean(1) ** 2, axis=-1)
    est = noise_scale.estimate_from_norms(sq_small, sq_big, small, big)
    # Means of the per-draw estimates, within 4 standard errors of the truth.
    for values, truth in ((est.grad_sq, grad_sq), (est.trace_sigma, trace)):
        stderr = values.std() / np.sqrt(draws)
        assert abs(values.mean() - truth) < 4 * stderr, (values.mean(), truth, stderr)
    ratio = noise_scale.simple_noise_scale(est.trace_sigma, est.grad_sq)
    assert ratio == pytest.approx(trace / grad_sq, rel=0.1)


def test_subset_noise_scale_matches_numpy():
    rng = np.random.default_rng(3)
    n, d, chunk = 384, 6, 32
    x, y, w = _regression(rng, n, d)
    b = 0.3
    residual = x @ w + b - y
    grads_w = residual[:, None] * x
    grads = np.concatenate([grads_w, residual[:, None]], axis=1)  # (w, b) per example
    chunk_grads = grads.reshape(n // chunk, chunk, -1).mean(1)
    sq_small = np.mean(np.sum(chunk_grads**2, -1))
    sq_big = np.sum(grads.mean(0) ** 2)
    expected_grad_sq = (n * sq_big - chunk * sq_small) / (n - chunk)
    expected_trace = (sq_small - sq_big) / (1 / chunk - 1 / n)

    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    batches = sharpness.chunk_batches(
        {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}, chunk
    )
    got = noise_scale.subset_noise_scale(_regression_loss, params, batches)
    assert (got.batch_small, got.batch_big) == (chunk, n)
    np.testing.assert_allclose(got.sq_norm_small, sq_small, rtol=1e-5)
    np.testing.assert_allclose(got.sq_norm_big, sq_big, rtol=1e-5)
    np.testing.assert_allclose(got.grad_sq, expected_grad_sq, rtol=1e-4)
    np.testing.assert_allclose(got.trace_sigma, expected_trace, rtol=1e-4)
    np.testing.assert_allclose(got.b_simple, expected_trace / expected_grad_sq, rtol=1e-4)
    np.testing.assert_allclose(got.loss, 0.5 * np.mean(residual**2), rtol=1e-5)
    assert got.wall_time_sec > 0


@pytest.mark.parametrize(
    "micro_batches, vectorize", [(1, False), (2, False), (2, True)], ids=["m1", "m2", "m2_vmap"]
)
def test_sharded_value_and_grad_matches_numpy_on_8_devices(devices, micro_batches, vectorize):
    rng = np.random.default_rng(4)
    n, d = 64, 5
    x, y, w = _regression(rng, n, d)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = jax.device_put(
        {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)},
        NamedSharding(mesh, P("data")),
    )
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def loss_with_aux(params, batch):
        return _regression_loss(params, batch), {"first_y": batch["y"][0]}

    fn = noise_scale.sharded_value_and_grad(
        loss_with_aux, mesh, micro_batches=micro_batches, has_aux=True, vectorize=vectorize
    )
    (loss, aux), grads, est = jax.jit(fn)(params, batch)

    shards = 8 * micro_batches
    residual = x @ w - y
    per_example = np.concatenate([residual[:, None] * x, residual[:, None]], axis=1)
    shard_grads = per_example.reshape(shards, n // shards, -1).mean(1)
    sq_small = np.mean(np.sum(shard_grads**2, -1))
    sq_big = np.sum(per_example.mean(0) ** 2)
    small = n // shards
    np.testing.assert_allclose(loss, 0.5 * np.mean(residual**2), rtol=1e-5)
    np.testing.assert_allclose(grads["w"], per_example[:, :d].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["b"], per_example[:, d].mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        est.grad_sq, (n * sq_big - small * sq_small) / (n - small), rtol=1e-4
    )
    np.testing.assert_allclose(
        est.trace_sigma, (sq_small - sq_big) / (1 / small - 1 / n), rtol=1e-4
    )
    # Aux keeps one entry per shard, in the order of the global batch.
    np.testing.assert_allclose(aux["first_y"], y[:: n // shards], rtol=1e-6)


def test_sharded_value_and_grad_folds_the_shard_into_the_rng(devices):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = jnp.asarray(np.random.default_rng(5).standard_normal((16, 3)), jnp.float32)

    def loss(params, batch, *, rng):
        noise = jax.random.normal(rng, batch.shape[:1])
        return jnp.mean(batch @ params), noise

    fn = noise_scale.sharded_value_and_grad(loss, mesh, has_aux=True)
    (_, noise), _, _ = jax.jit(fn)(jnp.ones(3), batch, rng=jax.random.PRNGKey(0))
    assert noise.shape == (8, 2)
    assert len({tuple(np.asarray(row)) for row in noise}) == 8  # one draw per shard


@pytest.mark.parametrize(
    "running_update, vectorize", [("sequential", False), ("mean", False), ("sequential", True)]
)
def test_sharded_step_of_a_ghost_bn_model_equals_the_global_step(
    devices, running_update, vectorize
):
    """What the trainer gets with the flag on: the same loss, gradients and statistics."""
    ghost, batch_size, micro_batches = 4, 64, 2
    model = models.get_model(
        "f1",
        num_classes=3,
        norm="ghost",
        ghost_batch_size=ghost,
        running_update=running_update,
        width=8,
        num_hidden=2,
    )
    rng = np.random.default_rng(6)
    images = jnp.asarray(rng.standard_normal((batch_size, 2, 3, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, batch_size), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), images[:1], train=False)
    params = variables["params"]
    old_stats = jax.tree.map(
        lambda v: v + jnp.asarray(rng.uniform(0.1, 1.0, v.shape), v.dtype),
        variables["batch_stats"],
    )

    def loss_fn(params, batch, batch_stats):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, new_vars["batch_stats"])

    (want_loss, (want_logits, want_stats)), want_grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {**params}, {"image": images, "label": labels}, old_stats
    )

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = jax.device_put({"image": images, "label": labels}, NamedSharding(mesh, P("data")))
    fn = noise_scale.sharded_value_and_grad(
        loss_fn, mesh, micro_batches=micro_batches, has_aux=True, vectorize=vectorize
    )
    (loss, (logits, shard_stats)), grads, est = jax.jit(fn)(params, batch, old_stats)
    shards = 8 * micro_batches
    stats = noise_scale.combine_running_stats(
        shard_stats,
        old_stats,
        rule=running_update,
        momentum=0.9,
        updates_per_shard=batch_size // shards // ghost,
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(logits.reshape(batch_size, -1), want_logits, rtol=1e-4, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(est.grad_sq) and np.isfinite(est.trace_sigma)
    assert est.sq_norm_small > est.sq_norm_big > 0


def test_combine_running_stats_sequential_against_a_loop():
    rng = np.random.default_rng(7)
    momentum, per_shard, shards = 0.9, 3, 4
    old = rng.standard_normal(5)
    stats = rng.standard_normal((shards, per_shard, 5))  # each ghost batch's statistic
    # Reference: the EMA applied ghost batch by ghost batch, in order.
    want = old.copy()
    for s in range(shards):
        for j in range(per_shard):
            want = momentum * want + (1 - momentum) * stats[s, j]
    # What each shard returns when it starts from `old`.
    shard_new = []
    for s in range(shards):
        v = old.copy()
        for j in range(per_shard):
            v = momentum * v + (1 - momentum) * stats[s, j]
        shard_new.append(v)
    got = noise_scale.combine_running_stats(
        {"m": jnp.asarray(np.stack(shard_new))},
        {"m": jnp.asarray(old)},
        rule="sequential",
        momentum=momentum,
        updates_per_shard=per_shard,
    )
    np.testing.assert_allclose(got["m"], want, rtol=1e-5, atol=1e-6)


def test_simple_noise_scale_divides_the_means():
    trace = np.array([10.0, 30.0, 20.0])
    grad_sq = np.array([1.0, -0.5, 2.5])
    assert noise_scale.simple_noise_scale(trace, grad_sq) == pytest.approx(60.0 / 3.0)


@pytest.mark.parametrize(
    ("small", "big", "match"),
    [(8, 8, "smaller than"), (16, 8, "smaller than"), (0, 8, "positive"), (2.5, 8, "positive")],
)
def test_estimate_rejects_bad_batch_sizes(small, big, match):
    with pytest.raises(ValueError, match=match):
        noise_scale.estimate_from_norms(1.0, 0.5, small, big)


def test_bad_inputs_raise_value_errors(devices):
    one_device = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="micro_batches=2"):
        noise_scale.sharded_value_and_grad(_regression_loss, one_device)
    with pytest.raises(ValueError, match="not an axis"):
        noise_scale.sharded_value_and_grad(_regression_loss, one_device, axis_name="batch")
    with pytest.raises(ValueError, match="micro_batches=0"):
        noise_scale.sharded_value_and_grad(_regression_loss, one_device, micro_batches=0)
    fn = noise_scale.sharded_value_and_grad(_regression_loss, one_device, micro_batches=4)
    params = {"w": jnp.zeros(2), "b": jnp.zeros(())}
    with pytest.raises(ValueError, match="multiple of the 4 shards"):
        fn(params, {"x": jnp.ones((6, 2)), "y": jnp.ones(6)})
    with pytest.raises(ValueError, match="at least two chunks"):
        noise_scale.subset_noise_scale(
            _regression_loss, params, {"x": jnp.ones((1, 4, 2)), "y": jnp.ones((1, 4))}
        )
    with pytest.raises(ValueError, match="shape"):
        noise_scale.simple_noise_scale(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="rule="):
        noise_scale.combine_running_stats({}, {}, rule="ema")
    with pytest.raises(ValueError, match="updates_per_shard"):
        noise_scale.combine_running_stats({}, {}, rule="sequential", momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        noise_scale.combine_running_stats({}, {}, rule="sequential", updates_per_shard=2)
