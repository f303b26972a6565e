"""Tests for gbn_jax.nnx.GhostBatchNorm: NNX conventions, same results as the linen module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gbn_jax import GhostBatchNorm as LinenGhostBatchNorm
from gbn_jax.nnx import GhostBatchNorm


def _random(rng, shape):
    return jnp.asarray(rng.normal(size=shape) * 2 + 0.5, jnp.float32)


def test_state_matches_nnx_batchnorm_and_ghost_none_equals_it():
    rng = np.random.default_rng(0)
    x = _random(rng, (12, 4))
    bn = nnx.BatchNorm(4, momentum=0.8, rngs=nnx.Rngs(0))
    gbn = GhostBatchNorm(4, momentum=0.8, rngs=nnx.Rngs(0))
    shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(m))
    assert shapes(gbn) == shapes(bn)
    for _ in range(2):  # training mode by default, statistics updated each call
        np.testing.assert_allclose(gbn(x), bn(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gbn.mean[...], bn.mean[...], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gbn.var[...], bn.var[...], rtol=1e-6, atol=1e-6)
    gbn.eval(), bn.eval()
    np.testing.assert_allclose(gbn(x[:5]), bn(x[:5]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("running_update", ["sequential", "mean"])
def test_same_results_as_linen_module(running_update):
    """Outputs, running statistics and gradients agree with the linen GhostBatchNorm."""
    rng = np.random.default_rng(1)
    x = _random(rng, (8, 3, 3, 5))
    dy = _random(rng, x.shape)
    layer = GhostBatchNorm(
        5, ghost_batch_size=2, running_update=running_update, momentum=0.9, rngs=nnx.Rngs(0)
    )
    layer.scale[...] = _random(rng, (5,))
    layer.bias[...] = _random(rng, (5,))
    linen = LinenGhostBatchNorm(ghost_batch_size=2, running_update=running_update, momentum=0.9)
    variables = {
        "params": {"scale": layer.scale[...], "bias": layer.bias[...]},
        "batch_stats": {"mean": layer.mean[...], "var": layer.var[...]},
    }

    @nnx.jit
    def step(layer, x):
        def loss(layer, x):
            return jnp.sum(layer(x) * dy)

        return nnx.grad(loss, argnums=(0, 1))(layer, x)

    g_layer, g_x = step(layer, x)

    def linen_loss(params, x):
        y, upd = linen.apply(
            {**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"]
        )
        return jnp.sum(y * dy), upd["batch_stats"]

    (ref_g_params, ref_g_x), stats = jax.grad(linen_loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x
    )
    np.testing.assert_allclose(g_x, ref_g_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_layer.scale[...], ref_g_params["scale"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_layer.bias[...], ref_g_params["bias"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.mean[...], stats["mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.var[...], stats["var"], rtol=1e-6, atol=1e-6)


def test_train_eval_toggle_view_and_errors():
    rng = np.random.default_rng(2)
    x = _random(rng, (8, 3))
    layer = GhostBatchNorm(3, ghost_batch_size=4, rngs=nnx.Rngs(0))
    layer.eval()
    assert layer.use_running_average is True
    before = np.asarray(layer.mean[...])
    y = layer(x[:5])  # inference: any batch size, statistics untouched
    np.testing.assert_allclose(y, x[:5] / np.sqrt(1 + 1e-5), rtol=1e-6)
    np.testing.assert_array_equal(layer.mean[...], before)
    layer.train()
    assert layer.use_running_average is False
    layer(x)
    assert not np.allclose(layer.mean[...], before)
    assert nnx.view(layer, use_running_average=True).use_running_average is True
    with pytest.raises(ValueError, match=r"\(5\).*\(4\)"):
        layer(x[:5])
    with pytest.raises(ValueError, match="running_update"):
        GhostBatchNorm(3, running_update="ema", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average"):
        GhostBatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)
