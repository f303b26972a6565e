"""Tests for gbn_jax.nnx.GhostBatchNorm: NNX conventions, same results as the linen module."""

import inspect

import flax.linen as nn
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


def test_accepts_every_argument_of_nnx_batchnorm():
    """Same names, kinds and defaults as nnx.BatchNorm's constructor (initializers
    compared by what they produce)."""
    ours = inspect.signature(GhostBatchNorm.__init__).parameters
    for name, theirs in inspect.signature(nnx.BatchNorm.__init__).parameters.items():
        assert name in ours, f"GhostBatchNorm lacks nnx.BatchNorm's argument {name!r}"
        assert ours[name].kind == theirs.kind, name
        a, b = ours[name].default, theirs.default
        if name.endswith("_init"):
            key = jax.random.key(0)
            np.testing.assert_array_equal(a(key, (3,), jnp.float32), b(key, (3,), jnp.float32))
        else:
            assert a is b or a == b, (name, a, b)


@pytest.mark.parametrize(
    "dtype,param_dtype,fast,masked",
    [
        (jnp.float32, jnp.float32, True, False),
        (jnp.float16, jnp.float32, False, True),
        (jnp.float32, jnp.float16, True, True),
        (jnp.float16, jnp.float16, False, False),
    ],
)
def test_no_promotion_gives_linen_results_bit_for_bit(dtype, param_dtype, fast, masked):
    """With promote_dtype the identity, the NNX layer follows linen's dtype rules: the
    same bits as the linen GhostBatchNorm, and nn.BatchNorm's results."""
    rng = np.random.default_rng(3)
    x = _random(rng, (10, 5))
    mask = jnp.asarray(rng.random(5) < 0.6) if masked else None  # per feature, as Flax tests
    kw = dict(dtype=dtype, param_dtype=param_dtype, use_fast_variance=fast, momentum=0.9)
    layer = GhostBatchNorm(
        5, promote_dtype=lambda args, **_: args, use_running_average=False, **kw, rngs=nnx.Rngs(0)
    )
    layer.scale[...] = _random(rng, (5,)).astype(param_dtype)
    layer.bias[...] = _random(rng, (5,)).astype(param_dtype)
    variables = {
        "params": {"scale": layer.scale[...], "bias": layer.bias[...]},
        "batch_stats": {"mean": layer.mean[...], "var": layer.var[...]},
    }
    y = layer(x, mask=mask)
    linen_y, linen_upd = LinenGhostBatchNorm(use_running_average=False, **kw).apply(
        variables, x, mask=mask, mutable=["batch_stats"]
    )
    np.testing.assert_array_equal(y, linen_y)
    np.testing.assert_array_equal(layer.mean[...], linen_upd["batch_stats"]["mean"])
    np.testing.assert_array_equal(layer.var[...], linen_upd["batch_stats"]["var"])
    bn_y, bn_upd = nn.BatchNorm(use_running_average=False, **kw).apply(
        variables, x, mask=mask, mutable=["batch_stats"]
    )
    # Features with every entry masked have no statistics: nn.BatchNorm gives NaN there,
    # GhostBatchNorm skips them in the running update (see test_ghost_norm).
    seen = np.ones(5, bool) if mask is None else np.asarray(mask)
    tol = 1e-2 if jnp.float16 in (dtype, param_dtype) else 1e-5
    np.testing.assert_allclose(y[:, seen], bn_y[:, seen], rtol=tol, atol=tol)
    bn_var = bn_upd["batch_stats"]["var"]
    np.testing.assert_allclose(layer.var[...][seen], bn_var[seen], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,param_dtype", [(jnp.float16, jnp.float32), (None, jnp.float16), (None, jnp.float32)]
)
def test_default_promotion_matches_nnx_batchnorm(dtype, param_dtype):
    """nnx.BatchNorm's promote_dtype rule (input, statistics and parameters cast to one
    dtype first), for one ghost batch and per ghost batch against plain-jnp reference."""
    rng = np.random.default_rng(4)
    x = _random(rng, (8, 2, 3))
    kw = dict(dtype=dtype, param_dtype=param_dtype, momentum=0.9)
    bn = nnx.BatchNorm(3, **kw, rngs=nnx.Rngs(0))
    gbn = GhostBatchNorm(3, **kw, rngs=nnx.Rngs(0))
    for m in (bn, gbn):
        m.scale[...] = jnp.linspace(0.5, 2.0, 3).astype(param_dtype)
        m.bias[...] = jnp.linspace(-1.0, 1.0, 3).astype(param_dtype)
    y, ref = gbn(x), bn(x)
    assert y.dtype == ref.dtype
    tol = 1e-5 if y.dtype == jnp.float32 else 2e-3
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)
    for name in ("mean", "var"):
        got, want = getattr(gbn, name)[...], getattr(bn, name)[...]
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    # Ghost batches of 4: each half normalized on its own, in the promoted dtype.
    gbn4 = GhostBatchNorm(3, ghost_batch_size=4, **kw, rngs=nnx.Rngs(0))
    y4 = gbn4(x)
    halves = [bn_half(x[i : i + 4], **kw) for i in (0, 4)]
    np.testing.assert_allclose(y4, jnp.concatenate(halves), rtol=tol, atol=tol)


def bn_half(x, **kw):
    return nnx.BatchNorm(x.shape[-1], **kw, rngs=nnx.Rngs(0))(x)


def test_graph_independent_of_initializers_and_metadata_on_params():
    """Like nnx layers: the graph does not depend on the initializers, and the
    *_metadata arguments end up on the Params."""
    make = lambda init: GhostBatchNorm(3, scale_init=init, bias_init=init, rngs=nnx.Rngs(0))
    assert nnx.graphdef(make(nnx.initializers.zeros)) == nnx.graphdef(make(nnx.initializers.ones))
    layer = GhostBatchNorm(
        3,
        scale_metadata={"tag": "gamma"},
        bias_metadata={"tag": "beta"},
        rngs=nnx.Rngs(0),
    )
    assert layer.scale.get_metadata()["tag"] == "gamma"
    assert layer.bias.get_metadata()["tag"] == "beta"


def test_forward_mode_through_the_nnx_layer():
    """jvp and jacfwd in training mode, against nnx.BatchNorm (one ghost batch)."""
    rng = np.random.default_rng(5)
    x, t = _random(rng, (8, 3)), _random(rng, (8, 3))

    def pure(module):  # training mode updates state: apply a fresh copy per trace
        graphdef, state = nnx.split(module)
        return lambda x: nnx.merge(graphdef, state, copy=True)(x)

    gbn = pure(GhostBatchNorm(3, ghost_batch_size=8, rngs=nnx.Rngs(0)))
    bn = pure(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(
        jax.jvp(gbn, (x,), (t,))[1], jax.jvp(bn, (x,), (t,))[1], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(jax.jacfwd(gbn)(x), jax.jacrev(bn)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [10, 9])  # remainders of 2 (own ghost batch) and 1 (joins)
def test_remainder_mode_same_bits_as_linen(batch):
    """remainder="own_ghost_batch" in NNX: the linen module's outputs, running
    statistics and input gradients, bit for bit (promote_dtype the identity)."""
    rng = np.random.default_rng(6)
    x, dy = _random(rng, (batch, 2, 2, 3)), _random(rng, (batch, 2, 2, 3))
    kw = dict(ghost_batch_size=4, remainder="own_ghost_batch", momentum=0.9)
    layer = GhostBatchNorm(3, promote_dtype=lambda args, **_: args, **kw, rngs=nnx.Rngs(0))
    layer.scale[...], layer.bias[...] = _random(rng, (3,)), _random(rng, (3,))
    variables = {
        "params": {"scale": layer.scale[...], "bias": layer.bias[...]},
        "batch_stats": {"mean": layer.mean[...], "var": layer.var[...]},
    }
    grad_x = jax.grad(lambda x: jnp.sum(nnx.merge(*nnx.split(layer), copy=True)(x) * dy))(x)
    y = layer(x)

    def linen_loss(x):
        y, upd = LinenGhostBatchNorm(use_running_average=False, **kw).apply(
            variables, x, mutable=["batch_stats"]
        )
        return jnp.sum(y * dy), (y, upd["batch_stats"])

    ref_grad_x, (ref_y, stats) = jax.grad(linen_loss, has_aux=True)(x)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(grad_x, ref_grad_x)
    np.testing.assert_array_equal(layer.mean[...], stats["mean"])
    np.testing.assert_array_equal(layer.var[...], stats["var"])
    with pytest.raises(ValueError, match="remainder='drop'"):
        GhostBatchNorm(3, remainder="drop", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"momentum=-0\.1"):
        GhostBatchNorm(3, momentum=-0.1, rngs=nnx.Rngs(0))
