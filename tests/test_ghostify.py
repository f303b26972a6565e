"""Tests for gbn_jax.ghostify: ghost batch norm in models written with plain BatchNorm.

The references are the same models written with GhostBatchNorm from the start: a
ResNet in the style of the Flax ImageNet example (linen) and a small NNX network.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gbn_jax import GhostBatchNorm
from gbn_jax import nnx as gbn_nnx
from gbn_jax.ghostify import ghost_batch_norm_scope, ghostify, ghostify_nnx

GHOST = 4


class ResNetBlock(nn.Module):
    """Two 3x3 convolutions with a projection shortcut (Flax examples/imagenet style)."""

    filters: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
        y = self.norm()(self.conv(self.filters, (3, 3))(y))
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """A two-stage ResNet whose normalization layer is a constructor argument."""

    norm_cls: Any = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(
            self.norm_cls, use_running_average=not train, momentum=0.9, epsilon=1e-5
        )
        x = nn.relu(norm(name="bn_init")(conv(8, (3, 3), name="conv_init")(x)))
        for i, strides in enumerate([(1, 1), (2, 2)]):
            x = ResNetBlock(8 * 2**i, conv=conv, norm=norm, strides=strides)(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def _renamed(tree, old, new):
    """The tree with ``old`` replaced by ``new`` in every dict key."""
    if isinstance(tree, dict):
        return {k.replace(old, new): _renamed(v, old, new) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        return type(tree)(_renamed(v, old, new) for v in tree)
    return tree


@pytest.fixture(scope="module")
def resnet_setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 16))
    # Random parameters and running statistics, so that every layer matters (drawn
    # with numpy: only the shapes come from the model, whose own init would compile a
    # random-number program per parameter shape).
    variables = jax.eval_shape(lambda x: ResNet().init(jax.random.key(0), x, train=False), x)
    variables = {
        "params": jax.tree.map(
            lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.5, v.dtype), variables["params"]
        ),
        "batch_stats": jax.tree.map(
            lambda v: jnp.asarray(rng.uniform(0.5, 1.5, size=v.shape), v.dtype),
            variables["batch_stats"],
        ),
    }
    return x, labels, variables


def _train_step(model, labels):
    """Logits, updated statistics and parameter gradients of one training step."""

    def step(variables, x):
        def loss(params):
            logits, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return ce, (logits, updates["batch_stats"])

        (_, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return logits, stats, grads

    return step


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def test_scope_turns_a_batchnorm_resnet_into_the_ghost_batchnorm_resnet(resnet_setup):
    """Outputs, gradients and running statistics equal those of the same ResNet
    written with GhostBatchNorm, from the plain model's own variables."""
    x, labels, variables = resnet_setup
    plain = ResNet()
    written = ResNet(norm_cls=functools.partial(GhostBatchNorm, ghost_batch_size=GHOST))
    # The model written with GhostBatchNorm names its auto-named layers differently;
    # the intercepted plain model keeps its names, so its checkpoint fits as it is.
    written_vars = jax.eval_shape(lambda x: written.init(jax.random.key(0), x, train=False), x)
    assert jax.tree.structure(_renamed(written_vars, "GhostBatchNorm_", "BatchNorm_")) == (
        jax.tree.structure(variables)
    )
    with ghost_batch_norm_scope(GHOST):
        got = _train_step(plain, labels)(variables, x)
    want = _train_step(written, labels)(_renamed(variables, "BatchNorm_", "GhostBatchNorm_"), x)
    assert_trees_close(got, _renamed(want, "GhostBatchNorm_", "BatchNorm_"), rtol=1e-4, atol=1e-5)
    # ... and they are not nn.BatchNorm's.
    plain_logits = _train_step(plain, labels)(variables, x)[0]
    assert not np.allclose(got[0], plain_logits, rtol=1e-3, atol=1e-3)


def test_ghostify_under_jit_and_inference_untouched(resnet_setup):
    x, labels, variables = resnet_setup
    plain = ResNet()
    written = ResNet(norm_cls=functools.partial(GhostBatchNorm, ghost_batch_size=GHOST))
    step = jax.jit(ghostify(_train_step(plain, labels), GHOST))
    want = _train_step(written, labels)(_renamed(variables, "BatchNorm_", "GhostBatchNorm_"), x)
    got = step(variables, x)
    assert_trees_close(got, _renamed(want, "GhostBatchNorm_", "BatchNorm_"), rtol=1e-4, atol=1e-5)
    # Inference runs nn.BatchNorm itself: the same bits.
    with ghost_batch_norm_scope(GHOST):
        eval_in_scope = plain.apply(variables, x, train=False)
    np.testing.assert_array_equal(eval_in_scope, plain.apply(variables, x, train=False))
    # ghost_batch_size=None is ordinary batch norm.
    with ghost_batch_norm_scope(None):
        none = _train_step(plain, labels)(variables, x)
    assert_trees_close(none, _train_step(plain, labels)(variables, x), rtol=1e-4, atol=1e-5)


def test_scope_replaces_only_batchnorms_own_computation():
    """A subclass that wraps nn.BatchNorm.__call__ keeps its own code around it; other
    modules and calls outside the scope are untouched; bad settings are rejected."""

    class Doubled(nn.BatchNorm):
        def __call__(self, x):
            return 2.0 * super().__call__(x)

    x = jax.random.normal(jax.random.key(0), (8, 3)) * 2 + 1
    layer = Doubled(use_running_average=False, momentum=0.9)
    variables = layer.init(jax.random.key(1), x)
    with ghost_batch_norm_scope(GHOST):
        y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    ref_y, ref_updates = GhostBatchNorm(
        use_running_average=False, momentum=0.9, ghost_batch_size=GHOST
    ).apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, 2.0 * ref_y, rtol=1e-5, atol=1e-5)
    assert_trees_close(updates, ref_updates)
    outside = layer.apply(variables, x, mutable=["batch_stats"])[0]
    ordinary = nn.BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(outside, 2.0 * ordinary[0], rtol=1e-5, atol=1e-5)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="ghost_batch_size"), ghost_batch_norm_scope(bad):
            pass
    with pytest.raises(ValueError, match="running_update"):
        ghostify(layer.apply, GHOST, running_update="ema")
    with pytest.raises(ValueError, match="remainder='pad'"):
        ghostify(layer.apply, GHOST, remainder="pad")


def test_remainder_mode_reaches_batchnorms_in_linen_and_nnx():
    """remainder="own_ghost_batch" through the linen scope and ghostify_nnx: the same
    results as the layers written with it, on a batch of 10 with ghost batches of 4."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(10, 3)) * 2 + 1, jnp.float32)
    kw = dict(use_running_average=False, momentum=0.9)
    variables = nn.BatchNorm(**kw).init(jax.random.key(0), x)
    with ghost_batch_norm_scope(GHOST, remainder="own_ghost_batch"):
        got = nn.BatchNorm(**kw).apply(variables, x, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="not a multiple"), ghost_batch_norm_scope(GHOST):
        nn.BatchNorm(**kw).apply(variables, x, mutable=["batch_stats"])
    written = GhostBatchNorm(ghost_batch_size=GHOST, remainder="own_ghost_batch", **kw)
    want = written.apply(variables, x, mutable=["batch_stats"])
    assert_trees_close(got, want, rtol=0, atol=0)
    model = ghostify_nnx(
        nnx.Sequential(nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))),
        GHOST,
        remainder="own_ghost_batch",
    )
    assert model.layers[0].remainder == "own_ghost_batch"
    np.testing.assert_allclose(model(x), want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.layers[0].mean[...], want[1]["batch_stats"]["mean"], atol=1e-7)


def _subtracts_on(closed_jaxpr, shape: tuple[int, ...]) -> bool:
    """Whether any subtraction in the jaxpr (nested ones included) has this shape."""

    def walk(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sub" and eqn.outvars[0].aval.shape == shape:
                return True
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns") and walk(inner):
                    return True
        return False

    return walk(closed_jaxpr.jaxpr)


@pytest.mark.parametrize("layout", ["input", "ghost_batches"])
def test_layout_reaches_batchnorms_in_linen_and_nnx(layout):
    """layout through the linen scope, ghostify and ghostify_nnx, and the NNX module:
    the centring x - mean runs on the split (2, 4, 3) view with "ghost_batches" only,
    and every route gives the written linen layer's results bit for bit."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(8, 3)) * 2 + 1, jnp.float32)
    kw = dict(use_running_average=False, momentum=0.9)
    variables = nn.BatchNorm(**kw).init(jax.random.key(0), x)
    written = GhostBatchNorm(ghost_batch_size=GHOST, layout=layout, **kw)
    apply = lambda module: lambda x: module.apply(variables, x, mutable=["batch_stats"])
    want = apply(written)(x)
    routes = {"written": apply(written)}
    routes["scope"] = ghostify(apply(nn.BatchNorm(**kw)), GHOST, layout=layout)
    swapped = ghostify_nnx(
        nnx.Sequential(nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))), GHOST, layout=layout
    )
    assert swapped.layers[0].layout == layout
    promote = dict(promote_dtype=lambda args, **_: args)
    layer = gbn_nnx.GhostBatchNorm(
        3, ghost_batch_size=GHOST, layout=layout, **promote, **kw, rngs=nnx.Rngs(0)
    )
    routes["nnx"] = lambda x: nnx.merge(*nnx.split(layer), copy=True)(x)
    routes["ghostify_nnx"] = lambda x: nnx.merge(*nnx.split(swapped), copy=True)(x)
    for name, route in routes.items():
        split = _subtracts_on(jax.make_jaxpr(route)(x), (2, GHOST, 3))
        assert split == (layout == "ghost_batches"), name
    assert_trees_close(routes["scope"](x), want, rtol=0, atol=0)
    np.testing.assert_array_equal(routes["nnx"](x), want[0])
    np.testing.assert_allclose(routes["ghostify_nnx"](x), want[0], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# NNX: swapping nnx.BatchNorm for GhostBatchNorm in a module graph.


class Net(nnx.Module):
    """Conv, batch norms in attributes, in a Sequential and one used twice (shared)."""

    def __init__(self, norm: Callable[..., nnx.Module], rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm = norm(8, momentum=0.8, epsilon=1e-3, rngs=rngs)
        self.same_norm = self.norm
        self.mlp = nnx.Sequential(
            nnx.Linear(8, 8, rngs=rngs), norm(8, use_fast_variance=False, rngs=rngs), nnx.relu
        )
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x))).mean(axis=(1, 2))
        return self.head(self.same_norm(self.mlp(x)))


def _random_state(module, rng):
    state = nnx.state(module)
    randomized = jax.tree.map(
        lambda v: jnp.asarray(rng.uniform(0.5, 1.5, size=v.shape), v.dtype), state
    )
    nnx.update(module, randomized)


def test_ghostify_nnx_swaps_every_batchnorm_and_keeps_its_variables():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(16, 6, 6, 3)), jnp.float32)
    model = Net(nnx.BatchNorm, nnx.Rngs(0))
    _random_state(model, rng)
    before = jax.tree.map(np.asarray, nnx.state(model))
    ghosted = ghostify_nnx(model, GHOST)
    kinds = [type(node) for _, node in nnx.iter_graph(ghosted)]
    assert nnx.BatchNorm not in kinds and kinds.count(gbn_nnx.GhostBatchNorm) == 2
    assert ghosted.same_norm is ghosted.norm  # shared reference stays shared
    assert ghosted.norm.scale is model.norm.scale and ghosted.norm.mean is model.norm.mean
    assert (ghosted.norm.momentum, ghosted.norm.epsilon) == (0.8, 1e-3)
    assert ghosted.mlp.layers[1].use_fast_variance is False
    assert_trees_close(jax.tree.map(np.asarray, nnx.state(ghosted)), before, rtol=0, atol=0)
    # Against the same network written with GhostBatchNorm, given the same state.
    written = Net(functools.partial(gbn_nnx.GhostBatchNorm, ghost_batch_size=GHOST), nnx.Rngs(1))
    nnx.update(written, nnx.state(model))
    np.testing.assert_allclose(ghosted(x), written(x), rtol=1e-5, atol=1e-5)
    assert_trees_close(nnx.state(ghosted), nnx.state(written))
    ghosted.eval(), written.eval(), model.eval()
    np.testing.assert_allclose(ghosted(x), model(x), rtol=0, atol=0)  # same BatchStats


def test_ghostify_nnx_trains_with_an_optimizer_built_before_the_swap():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(16, 6, 6, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 16))
    model = Net(nnx.BatchNorm, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    model = ghostify_nnx(model, GHOST)
    written = Net(functools.partial(gbn_nnx.GhostBatchNorm, ghost_batch_size=GHOST), nnx.Rngs(1))
    nnx.update(written, nnx.state(model))
    written_optimizer = nnx.Optimizer(written, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    for _ in range(2):
        assert np.isclose(
            train_step(model, optimizer, x), train_step(written, written_optimizer, x)
        )
    assert_trees_close(nnx.state(model), nnx.state(written), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="ghost_batch_size"):
        ghostify_nnx(model, -1)
