"""Tests for gbn_jax.ghost_norm against references written independently of it.

References: a float64 numpy implementation of Algorithm 1 (per-group loop), and
``flax.linen.BatchNorm`` applied ghost batch by ghost batch with its running statistics
threaded through (which is exactly Algorithm 1's sequential update).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gbn_jax import GhostBatchNorm, ghost_batch_norm
from gbn_jax.ghost_norm import LAYOUTS

EPS = 1e-5


def np_running_update(rm, rv, means, variances, seen, momentum, update):
    """Running statistics after the ghost batches' (mean, var), in order, in float64:
    one EMA step per non-empty ghost batch ("sequential"), or one with their average."""
    rm, rv = np.array(rm, np.float64), np.array(rv, np.float64)
    if update == "sequential":
        for mu, var, s in zip(means, variances, seen, strict=True):
            rm = np.where(s, momentum * rm + (1 - momentum) * mu, rm)
            rv = np.where(s, momentum * rv + (1 - momentum) * var, rv)
        return rm, rv
    k = np.maximum(np.sum(seen, 0), 1)
    avg_m = np.sum([mu * s for mu, s in zip(means, seen, strict=True)], 0) / k
    avg_v = np.sum([v * s for v, s in zip(variances, seen, strict=True)], 0) / k
    rm = np.where(np.any(seen, 0), momentum * rm + (1 - momentum) * avg_m, rm)
    rv = np.where(np.any(seen, 0), momentum * rv + (1 - momentum) * avg_v, rv)
    return rm, rv


def np_ghost_bn(
    x, scale, bias, rm, rv, *, ghost, axis=-1, momentum=0.9, update="sequential", mask=None
):
    """Algorithm 1 in float64 numpy, one ghost batch at a time."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    xt = np.moveaxis(x, axis, -1)
    n, c = x.shape[0], xt.shape[-1]
    groups = 1 if ghost is None or ghost >= n else n // ghost
    xg = xt.reshape(groups, -1, c)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    mg = np.moveaxis(m, axis, -1).reshape(groups, -1, c)
    y = np.empty_like(xg)
    means, variances, seen = [], [], []
    for g in range(groups):
        cnt = mg[g].sum(0)
        mu = (xg[g] * mg[g]).sum(0) / np.maximum(cnt, 1)
        var = (((xg[g] - mu) ** 2) * mg[g]).sum(0) / np.maximum(cnt, 1)
        y[g] = (xg[g] - mu) / np.sqrt(var + EPS) * scale + bias
        means.append(mu), variances.append(var), seen.append(cnt > 0)
    rm, rv = np_running_update(rm, rv, means, variances, seen, momentum, update)
    y = np.moveaxis(y.reshape(xt.shape), -1, axis)
    return y, rm, rv


def random_inputs(rng, shape, c):
    x = rng.normal(size=shape) * rng.uniform(0.5, 3.0) + rng.normal()
    scale, bias = rng.normal(size=c), rng.normal(size=c)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
    return [np.asarray(a, np.float32) for a in (x, scale, bias, rm, rv)]


@pytest.mark.parametrize(
    "shape,ghost,axis,update,use_fast_variance",
    [
        ((24, 5), 8, -1, "sequential", True),
        ((24, 5), 6, -1, "mean", False),
        ((8, 3, 3, 4), 2, -1, "sequential", True),  # conv NHWC
        ((12, 4, 3), 3, 1, "sequential", False),  # feature axis in the middle
        ((6, 7), 8, -1, "sequential", True),  # batch smaller than the ghost size
    ],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_numpy_algorithm1(shape, ghost, axis, update, use_fast_variance, layout):
    rng = np.random.default_rng(len(shape) * 100 + ghost)
    c = shape[axis]
    x, scale, bias, rm, rv = random_inputs(rng, shape, c)
    y, new_m, new_v = ghost_batch_norm(
        jnp.asarray(x),
        scale,
        bias,
        rm,
        rv,
        use_running_average=False,
        ghost_batch_size=ghost,
        running_update=update,
        layout=layout,
        axis=axis,
        momentum=0.9,
        use_fast_variance=use_fast_variance,
    )
    ry, rm2, rv2 = np_ghost_bn(x, scale, bias, rm, rv, ghost=ghost, axis=axis, update=update)
    np.testing.assert_allclose(y, ry, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new_m, rm2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_v, rv2, rtol=1e-5, atol=1e-5)


def test_random_shapes_and_ghost_sizes():
    rng = np.random.default_rng(7)
    for _ in range(3):
        ghost = int(rng.integers(1, 6))
        shape = (
            ghost * int(rng.integers(1, 5)),
            *rng.integers(1, 4, size=int(rng.integers(0, 3))),
            int(rng.integers(1, 6)),
        )
        update = str(rng.choice(["sequential", "mean"]))
        x, scale, bias, rm, rv = random_inputs(rng, shape, shape[-1])
        y, m, v = ghost_batch_norm(
            jnp.asarray(x),
            scale,
            bias,
            rm,
            rv,
            use_running_average=False,
            ghost_batch_size=ghost,
            running_update=update,
            momentum=0.9,
        )
        ry, rm2, rv2 = np_ghost_bn(x, scale, bias, rm, rv, ghost=ghost, update=update)
        np.testing.assert_allclose(y, ry, rtol=1e-4, atol=2e-4, err_msg=f"{shape=} {ghost=}")
        np.testing.assert_allclose(m, rm2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v, rv2, rtol=1e-5, atol=1e-5)


def _loss_and_stats(module, variables, x, dy, **kw):
    """sum(y * dy) and the updated running statistics, for gradient comparisons."""

    def loss(params, x):
        y, upd = module.apply(
            {**variables, "params": params},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
            **kw,
        )
        return jnp.sum(y * dy), (y, upd["batch_stats"])

    (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x
    )
    return y, stats, grads


def _perturbed_variables(rng, c):
    return {
        "params": {
            "scale": jnp.asarray(rng.normal(size=c), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=c), jnp.float32),
        },
        "batch_stats": {
            "mean": jnp.asarray(rng.normal(size=c), jnp.float32),
            "var": jnp.asarray(rng.uniform(0.5, 2, size=c), jnp.float32),
        },
    }


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("shape,ghost,masked", [((16, 6), 4, False), ((8, 3, 3, 5), 2, True)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_batchnorm_threaded_group_by_group(shape, ghost, masked, layout):
    """Outputs, gradients and running statistics equal nn.BatchNorm run per ghost batch."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
    dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
    mask = None
    if masked:  # keep at least one example per ghost batch (nn.BatchNorm needs one)
        rows = rng.random(shape[0]) < 0.6
        rows[::ghost] = True
        mask = jnp.asarray(rows.reshape(-1, *[1] * (len(shape) - 1)))
    variables = _perturbed_variables(rng, shape[-1])
    gbn = GhostBatchNorm(momentum=0.9, ghost_batch_size=ghost, layout=layout)
    y, stats, (g_params, g_x) = _loss_and_stats(gbn, variables, x, dy, mask=mask)

    bn = nn.BatchNorm(momentum=0.9)

    def threaded(params, x):
        state, ys = variables["batch_stats"], []
        for j in range(shape[0] // ghost):
            sl = slice(j * ghost, (j + 1) * ghost)
            yj, upd = bn.apply(
                {"params": params, "batch_stats": state},
                x[sl],
                use_running_average=False,
                mutable=["batch_stats"],
                mask=None if mask is None else mask[sl],
            )
            state = upd["batch_stats"]
            ys.append(yj)
        y = jnp.concatenate(ys)
        return jnp.sum(y * dy), (y, state)

    (_, (ry, rstats)), (rg_params, rg_x) = jax.value_and_grad(
        threaded, argnums=(0, 1), has_aux=True
    )(variables["params"], x)
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=2e-5)
    assert_trees_close(stats, rstats)
    assert_trees_close(g_params, rg_params, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_x, rg_x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "ghost,fast,masked", [(None, True, False), (16, False, False), (64, True, True)]
)
def test_equals_batchnorm_without_split(ghost, fast, masked):
    """ghost_batch_size None or >= batch is nn.BatchNorm: outputs, grads, statistics."""
    rng = np.random.default_rng(11)
    shape = (16, 2, 2, 3)
    x = jnp.asarray(rng.normal(size=shape) * 3 - 2, jnp.float32)
    dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
    mask = jnp.asarray(rng.random((16, 1, 1, 1)) < 0.7) if masked else None
    variables = _perturbed_variables(rng, 3)
    kw = dict(momentum=0.8, use_fast_variance=fast)
    out = _loss_and_stats(GhostBatchNorm(ghost_batch_size=ghost, **kw), variables, x, dy, mask=mask)
    ref = _loss_and_stats(nn.BatchNorm(**kw), variables, x, dy, mask=mask)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6, atol=1e-6)
    assert_trees_close(out[1], ref[1], rtol=1e-6, atol=1e-6)
    assert_trees_close(out[2], ref[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "ghost,remainder", [(None, "error"), (32, "error"), (31, "own_ghost_batch")]
)
def test_one_ghost_batch_compiles_without_a_group_axis(ghost, remainder):
    """With one ghost batch (also 31 examples and a remainder of one, which joins them)
    the input is normalized as it comes: no array of the compiled forward and backward
    pass carries a size-1 group axis in front of the batch (XLA:CPU turns the backward's
    sum of dy * (x - mean) over such a layout into a reduction tens of times slower than
    nn.BatchNorm's)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(32, 24)), jnp.float32)
    module = GhostBatchNorm(ghost_batch_size=ghost, remainder=remainder, use_running_average=False)
    variables = module.init(jax.random.key(0), x)

    def loss(params, x):
        y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    hlo = grad.lower(variables["params"], x).compile().as_text()
    assert "f32[32,24]" in hlo
    assert re.findall(r"f32\[1,32,24\]", hlo) == []
    grouped = jax.jit(lambda x: 2 * x.reshape(1, 32, 24)).lower(x).compile().as_text()
    assert re.findall(r"f32\[1,32,24\]", grouped)  # the pattern finds such an array


@pytest.mark.parametrize("layout", LAYOUTS)
def test_image_input_is_split_into_ghost_batches_for_the_sums_only(layout):
    """Conv -> GhostBatchNorm (4 ghost batches) -> ReLU -> pool -> conv: with
    layout="input" the compiled forward and backward pass writes no array in the split
    (groups, ghost, H, W, C) layout; only the sums read the input that way. (Written on
    the split layout, the elementwise passes led XLA:CPU to order a conv net's backward
    pass so that each weight-gradient convolution ran alone.) layout="ghost_batches"
    writes it."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), use_bias=False)(x)
            gbn = GhostBatchNorm(ghost_batch_size=8, use_running_average=False, layout=layout)
            x = nn.relu(gbn(x))
            return nn.Conv(4, (3, 3))(nn.max_pool(x, (2, 2), (2, 2)))

    x = jnp.asarray(np.random.default_rng(5).normal(size=(32, 8, 8, 3)), jnp.float32)
    variables = Net().init(jax.random.key(0), x)

    def loss(params, x):
        y, _ = Net().apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * y)

    def written(compiled):
        hlo = compiled.as_text()
        entry = hlo[hlo.index("\nENTRY") :]
        return re.findall(r"^\s*(?:ROOT )?%\S+ = \(?(\S+\[[\d,]*\])", entry, re.M), hlo

    shapes, hlo = written(jax.jit(jax.grad(loss)).lower(variables["params"], x).compile())
    assert "f32[32,8,8,8]" in shapes
    assert ("f32[4,8,8,8,8]" in shapes) == (layout == "ghost_batches")
    assert "f32[4,8,8,8,8]" in hlo  # the sums' view of the input, inside fusions
    split = jax.jit(lambda v: 2 * v.reshape(4, 8, 8, 8, 8)).lower(jnp.ones((32, 8, 8, 8)))
    assert "f32[4,8,8,8,8]" in written(split.compile())[0]  # the pattern finds one


def test_variables_init_and_inference_match_batchnorm():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)
    key = jax.random.key(0)
    gbn = GhostBatchNorm(
        ghost_batch_size=4,
        scale_init=nn.initializers.normal(1.0),
        bias_init=nn.initializers.normal(1.0),
    )
    bn = nn.BatchNorm(scale_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))
    v_gbn = gbn.init(key, x, use_running_average=False)
    v_bn = bn.init(key, x, use_running_average=False)
    # Same names, shapes, dtypes and initial values (no running-stat update at init).
    assert_trees_close(v_gbn, v_bn, rtol=0, atol=0)
    np.testing.assert_array_equal(v_gbn["batch_stats"]["mean"], np.zeros(4))
    # Inference: running statistics, no split, any batch size; field or per-call flag.
    variables = {**v_gbn, "batch_stats": _perturbed_variables(rng, 4)["batch_stats"]}
    x7 = x[:7]
    y_call = gbn.apply(variables, x7, use_running_average=True)
    y_field = gbn.clone(use_running_average=True).apply(variables, x7)
    ref = bn.apply(variables, x7, use_running_average=True)
    np.testing.assert_allclose(y_call, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y_field, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="use_running_average"):
        gbn.clone(use_running_average=True).apply(variables, x7, use_running_average=False)


def test_bfloat16_inputs_use_float32_statistics():
    rng = np.random.default_rng(9)
    x32, scale, bias, rm, rv = random_inputs(rng, (16, 2, 2, 3), 3)
    x = jnp.asarray(x32, jnp.bfloat16)
    y, m, v = ghost_batch_norm(
        x, scale, bias, rm, rv, use_running_average=False, ghost_batch_size=4, momentum=0.9
    )
    ry, rm2, rv2 = np_ghost_bn(np.asarray(x, np.float32), scale, bias, rm, rv, ghost=4)
    assert y.dtype == jnp.float32 and m.dtype == jnp.float32 and v.dtype == jnp.float32
    np.testing.assert_allclose(y, ry, rtol=1e-4, atol=1e-4)  # statistics exact in float32
    np.testing.assert_allclose(m, rm2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, rv2, rtol=1e-5, atol=1e-5)
    y16, _, _ = ghost_batch_norm(
        x, scale, bias, rm, rv, use_running_average=False, ghost_batch_size=4, dtype=jnp.bfloat16
    )
    assert y16.dtype == jnp.bfloat16
    g = jax.grad(
        lambda x: ghost_batch_norm(
            x, scale, bias, rm, rv, use_running_average=False, ghost_batch_size=4
        )[0].sum()
    )(x)
    assert g.dtype == jnp.bfloat16


def test_mask_excludes_examples_and_skips_empty_ghost_batches():
    rng = np.random.default_rng(13)
    x, scale, bias, rm, rv = random_inputs(rng, (12, 2, 3), 3)
    rows = rng.random(12) < 0.6
    rows[0], rows[4], rows[8:] = True, True, False  # third ghost batch fully masked
    mask = rows[:, None, None]
    for update in ("sequential", "mean"):
        y, m, v = ghost_batch_norm(
            jnp.asarray(x),
            scale,
            bias,
            rm,
            rv,
            use_running_average=False,
            ghost_batch_size=4,
            running_update=update,
            momentum=0.9,
            mask=mask,
        )
        ry, rm2, rv2 = np_ghost_bn(x, scale, bias, rm, rv, ghost=4, update=update, mask=mask)
        np.testing.assert_allclose(y[:8], ry[:8], rtol=1e-4, atol=1e-4)
        assert np.isfinite(np.asarray(y)).all()
        np.testing.assert_allclose(m, rm2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v, rv2, rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
    x = jnp.ones((10, 3))
    args = (None, None, jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match=r"\(10\).*\(4\).*mask"):
        ghost_batch_norm(x, *args, use_running_average=False, ghost_batch_size=4)
    # The suggested ghost size is the divisor of the batch nearest the asked one.
    with pytest.raises(ValueError, match=r"divides 10 \(e\.g\. 5\)"):
        ghost_batch_norm(x, *args, use_running_average=False, ghost_batch_size=4)
    # Of two equally near divisors (4 and 6 for 5 in 12), the smaller.
    with pytest.raises(ValueError, match=r"divides 12 \(e\.g\. 4\)"):
        ghost_batch_norm(jnp.ones((12, 3)), *args, use_running_average=False, ghost_batch_size=5)
    with pytest.raises(ValueError, match="running_update='average'"):
        ghost_batch_norm(x, *args, use_running_average=False, running_update="average")
    with pytest.raises(ValueError, match=r"layout='split'.*'ghost_batches'"):
        ghost_batch_norm(x, *args, use_running_average=False, layout="split")
    with pytest.raises(ValueError, match=r"layout='NHWC'"):
        GhostBatchNorm(layout="NHWC")
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="ghost_batch_size"):
            ghost_batch_norm(x, *args, use_running_average=False, ghost_batch_size=bad)
    with pytest.raises(ValueError, match=r"mask shape \(10,\)"):
        ghost_batch_norm(x, *args, use_running_average=False, mask=jnp.ones(10, bool))
    with pytest.raises(ValueError, match="momentum"):
        ghost_batch_norm(x, *args, use_running_average=False, momentum=1.5)
    with pytest.raises(ValueError, match="leading axis"):
        ghost_batch_norm(
            jnp.ones((10, 3)),
            None,
            None,
            jnp.zeros(10),
            jnp.ones(10),
            use_running_average=False,
            ghost_batch_size=5,
            axis=0,
        )
    with pytest.raises(ValueError, match="not a multiple"):
        GhostBatchNorm(ghost_batch_size=4).init(jax.random.key(0), x, use_running_average=False)


# --------------------------------------------------------------------------------------
# Drop-in for nn.BatchNorm: the behaviours Flax's own BatchNorm tests check, and the
# input layouts where a ghost split is undefined.


def np_batch_norm(x, reduce_axes, mask=None):
    """Closed-form batch norm in float64, complex-aware: (x_hat, mean, biased variance)."""
    x = np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    count = m.sum(reduce_axes, keepdims=True)
    mean = np.where(m, x, 0).sum(reduce_axes, keepdims=True) / count
    var = np.where(m, np.abs(x - mean) ** 2, 0).sum(reduce_axes, keepdims=True) / count
    return (x - mean) / np.sqrt(var + EPS), mean, var


def _random_variables(rng, features, dtype=jnp.float32):
    """Parameters and running statistics of a BatchNorm with these feature dims."""
    draw = lambda: jnp.asarray(rng.normal(size=features), dtype)
    return {
        "params": {"scale": draw(), "bias": draw()},
        "batch_stats": {"mean": draw(), "var": jnp.abs(draw()) + 0.5},
    }


@pytest.mark.parametrize("ghost", [None, 8, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_normalized_statistics_and_running_average_in_closed_form(ghost, masked):
    """Each ghost batch comes out with mean 0 and variance 1 over its unmasked entries
    and the running statistics follow m * init + (1 - m) * stat; masked entries may
    hold NaN without spoiling anything."""
    rng = np.random.default_rng(21)
    x = rng.normal(size=(8, 3, 2)) * 1.7 - 0.4
    mask = None
    if masked:  # per (example, position), shared by the features
        mask = rng.random((8, 3, 1)) < 0.6
        mask[::4, 0] = True  # every ghost batch keeps some entries
        x = np.where(mask, x, np.nan)
    module = GhostBatchNorm(momentum=0.9, use_running_average=False, ghost_batch_size=ghost)
    xj = jnp.asarray(x, jnp.float32)
    y, variables = module.init_with_output(jax.random.key(0), xj, mask=mask)
    _, updates = module.apply(variables, xj, mutable=["batch_stats"], mask=mask)
    groups = 1 if ghost is None else 8 // ghost
    ys, masks = np.asarray(y).reshape(groups, -1, 3, 2), [None] * groups
    if masked:
        masks = mask.reshape(groups, -1, 3, 1)
    ref_mean, ref_var = 0.0, 1.0
    for xg, yg, mg in zip(x.reshape(groups, -1, 3, 2), ys, masks, strict=True):
        x_hat, mean, var = np_batch_norm(xg, (0, 1), mg)
        keep = np.ones(xg.shape, bool) if mg is None else np.broadcast_to(mg, xg.shape)
        np.testing.assert_allclose(yg[keep], x_hat[keep], rtol=1e-4, atol=1e-4)
        ref_mean = 0.9 * ref_mean + 0.1 * mean.reshape(2)
        ref_var = 0.9 * ref_var + 0.1 * var.reshape(2)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], ref_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ghost", [None, 4, 2])
@pytest.mark.parametrize("fast", [True, False])
def test_complex_inputs_use_abs_squared_and_keep_complex_statistics(ghost, fast):
    """Variance E|x - mean|^2 (real) and a complex running mean, as flax.linen has."""
    rng = np.random.default_rng(23)
    x = (rng.normal(size=(4, 3, 2)) + 1j * rng.normal(size=(4, 3, 2))) * 1.5 + (0.3 - 0.7j)
    xc = jnp.asarray(x, jnp.complex64)
    kw = dict(momentum=0.9, use_running_average=False, dtype=jnp.complex64, use_fast_variance=fast)
    module = GhostBatchNorm(ghost_batch_size=ghost, **kw)
    variables = module.init(jax.random.key(0), xc)
    y, updates = module.apply(variables, xc, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    assert y.dtype == jnp.complex64 and stats["mean"].dtype == jnp.complex64
    assert stats["var"].dtype == jnp.float32
    groups = 1 if ghost is None else 4 // ghost
    ref_mean, ref_var, ref_y = 0.0, 1.0, []
    for xg in x.reshape(groups, -1, 3, 2):
        x_hat, mean, var = np_batch_norm(xg, (0, 1))
        ref_y.append(x_hat)
        ref_mean = 0.9 * ref_mean + 0.1 * mean.reshape(2)
        ref_var = 0.9 * ref_var + 0.1 * var.reshape(2)
    np.testing.assert_allclose(y, np.concatenate(ref_y), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["mean"], ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["var"], ref_var, rtol=1e-5, atol=1e-5)
    if ghost is None:
        bn_y, bn_updates = nn.BatchNorm(**kw).apply(variables, xc, mutable=["batch_stats"])
        np.testing.assert_allclose(y, bn_y, rtol=1e-5, atol=1e-5)
        assert_trees_close(updates, bn_updates)
    y_eval = module.clone(use_running_average=True).apply({**variables, **updates}, xc)
    np.testing.assert_allclose(
        y_eval, (x - ref_mean) / np.sqrt(ref_var + EPS), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("shape,axis", [((5,), -1), ((6, 4), 0), ((6, 4, 3), (0, 2))])
def test_leading_feature_axis_and_1d_inputs_match_batchnorm(shape, axis):
    """With features on the leading axis there is no batch to split: the statistics
    reduce every other axis, as in nn.BatchNorm (a 1-D input normalizes to the bias)."""
    rng = np.random.default_rng(29)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
    features = [a % len(shape) for a in (axis if isinstance(axis, tuple) else (axis,))]
    feature_dims = tuple(shape[a] for a in features)
    variables = _random_variables(rng, feature_dims)
    kw = dict(axis=axis, momentum=0.8, use_running_average=False)
    bn_y, bn_updates = nn.BatchNorm(**kw).apply(variables, x, mutable=["batch_stats"])
    for ghost in (None, shape[0]):
        module = GhostBatchNorm(ghost_batch_size=ghost, **kw)
        y, updates = module.apply(variables, x, mutable=["batch_stats"])
        np.testing.assert_allclose(y, bn_y, rtol=1e-5, atol=1e-5)
        assert_trees_close(updates, bn_updates, rtol=1e-6, atol=1e-6)
    reduce_axes = tuple(a for a in range(len(shape)) if a not in features)
    x_hat, mean, _ = np_batch_norm(x, reduce_axes)
    as_x = lambda v: np.expand_dims(np.asarray(v), reduce_axes)
    p = variables["params"]
    np.testing.assert_allclose(y, x_hat * as_x(p["scale"]) + as_x(p["bias"]), rtol=1e-4, atol=1e-4)
    expected_mean = 0.8 * np.asarray(variables["batch_stats"]["mean"]) + 0.2 * mean.squeeze(
        reduce_axes
    )
    np.testing.assert_allclose(updates["batch_stats"]["mean"], expected_mean, rtol=1e-5, atol=1e-5)


def test_init_ignores_axis_name_and_repeated_calls_share_variables():
    """Initializing outside any mapped axis works with axis_name set (as nn.BatchNorm);
    one module called twice uses one set of variables, and normalizing its own output
    again changes it only through epsilon."""

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = GhostBatchNorm(use_running_average=False, axis_name="batch", ghost_batch_size=4)
            return norm(x), norm(norm(x))

    x = jax.random.normal(jax.random.key(1), (8, 3)) * 3 + 1
    (y1, y2), variables = Twice().init_with_output(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables)["params"] == {
        "GhostBatchNorm_0": {"bias": (3,), "scale": (3,)}
    }
    np.testing.assert_allclose(y1, y2, rtol=5e-3, atol=5e-3)


def test_layout_errors_name_the_value_and_the_fix():
    args = (None, None, jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match=r"1-D input has no batch axis.*ghost_batch_size=None"):
        ghost_batch_norm(jnp.ones(3), *args, use_running_average=False, ghost_batch_size=2)
    with pytest.raises(ValueError, match=r"axis=0.*axis=-1"):
        ghost_batch_norm(
            jnp.ones((4, 3)), *args, use_running_average=False, ghost_batch_size=2, axis=0
        )
    with pytest.raises(ValueError, match=r"Feature axis 2 is out of range.*rank 2"):
        ghost_batch_norm(jnp.ones((4, 3)), *args, use_running_average=False, axis=2)
    with pytest.raises(ValueError, match="at least one axis"):
        GhostBatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones(()))


# --------------------------------------------------------------------------------------
# Forward-mode differentiation (the backward is JAX's transpose of a custom JVP rule).


def jnp_ghost_bn(x, scale, bias, ghost):
    """Algorithm 1 in plain jnp, features last, differentiated by JAX's own rules."""
    groups = x.reshape(x.shape[0] // ghost, -1, x.shape[-1])
    mean = groups.mean(1, keepdims=True)
    var = jnp.square(groups - mean).mean(1, keepdims=True)
    return ((groups - mean) / jnp.sqrt(var + EPS) * scale + bias).reshape(x.shape)


@pytest.mark.parametrize(
    "ghost,fast,masked,layout",
    [
        (None, True, False, "input"),
        (None, False, True, "input"),
        (4, True, False, "input"),
        (4, False, False, "input"),
        (4, True, False, "ghost_batches"),
        (4, False, False, "ghost_batches"),
    ],
)
def test_forward_mode_jvp_jacfwd_and_hessian_vector_products(ghost, fast, masked, layout):
    """jvp, jacfwd and forward-over-reverse HVPs agree with nn.BatchNorm (one ghost
    batch) or with plain-jnp Algorithm 1 (ghost batches), and with reverse mode."""
    rng = np.random.default_rng(31)
    x = jnp.asarray(rng.normal(size=(8, 2, 3)) * 2 + 1, jnp.float32)
    variables = _random_variables(rng, (3,))
    mask = jnp.asarray(rng.random((8, 2, 1)) < 0.7) if masked else None
    primals = (x, variables["params"]["scale"], variables["params"]["bias"])
    tangents = tuple(jnp.asarray(rng.normal(size=p.shape), jnp.float32) for p in primals)
    kw = dict(use_fast_variance=fast, use_running_average=False)

    def layer(module):
        def f(x, scale, bias):
            v = {**variables, "params": {"scale": scale, "bias": bias}}
            return module.apply(v, x, mutable=["batch_stats"], mask=mask)[0]

        return f

    gbn = layer(GhostBatchNorm(ghost_batch_size=ghost, layout=layout, **kw))
    if ghost is None:
        ref = layer(nn.BatchNorm(**kw))
    else:
        ref = lambda x, scale, bias: jnp_ghost_bn(x, scale, bias, ghost)
    # Each derivative jitted whole: one compile instead of one per primitive it runs.
    jvp = lambda f: jax.jit(lambda p, t: jax.jvp(f, p, t))(primals, tangents)
    (y, dy), (ref_y, ref_dy) = jvp(gbn), jvp(ref)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dy, ref_dy, rtol=1e-4, atol=1e-4)
    jac = lambda transform, f, arg: jax.jit(transform(f, arg))(*primals)
    for arg in range(3):
        forward = jac(jax.jacfwd, gbn, arg)
        np.testing.assert_allclose(forward, jac(jax.jacfwd, ref, arg), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(forward, jac(jax.jacrev, gbn, arg), rtol=1e-4, atol=1e-4)
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    loss = lambda f: lambda *args: jnp.sum(jnp.tanh(f(*args)) * w)
    hvp = lambda f: jax.jit(lambda p, t: jax.jvp(jax.grad(loss(f), (0, 1, 2)), p, t)[1])(
        primals, tangents
    )
    assert_trees_close(hvp(gbn), hvp(ref), rtol=1e-3, atol=1e-4)
    # Reverse over reverse: the gradient of <grad L, t> is the same H t.
    grad_dot_t = lambda *args: sum(
        jnp.vdot(g, t) for g, t in zip(jax.grad(loss(gbn), (0, 1, 2))(*args), tangents, strict=True)
    )
    assert_trees_close(
        jax.jit(jax.grad(grad_dot_t, (0, 1, 2)))(*primals), hvp(gbn), rtol=1e-3, atol=1e-4
    )


# --------------------------------------------------------------------------------------
# Sharded execution: ghost batches need no cross-device communication.

COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s"
    r"(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(",
    re.MULTILINE,
)


def collectives(hlo: str) -> list[tuple[str, str]]:
    """(op, result shape) for every cross-device collective in an HLO module."""
    return [(op, shape) for shape, op in COLLECTIVE.findall(hlo)]


class TwoLayer(nn.Module):
    norm: type = nn.BatchNorm
    ghost: int | None = None
    layout: str = "input"

    @nn.compact
    def __call__(self, x, train: bool):
        for i, width in enumerate((12, 10)):
            x = nn.Dense(width)(x)
            kw = {"ghost_batch_size": self.ghost, "layout": self.layout}
            kw = {} if self.norm is nn.BatchNorm else kw
            norm = self.norm(use_running_average=not train, momentum=0.9, name=f"norm{i}", **kw)
            x = nn.relu(norm(x))
        return nn.Dense(3)(x)


BATCH = 64  # 8 examples per device


@pytest.fixture(scope="module")
def sharded_setup(devices):
    mesh = Mesh(np.array(devices), ("data",))
    rng = np.random.default_rng(17)
    x = jnp.asarray(rng.normal(size=(BATCH, 7)) * 2 + 0.5, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(BATCH, 3)), jnp.float32)
    variables = jax.jit(TwoLayer().init, static_argnames="train")(jax.random.key(0), x, train=False)
    return mesh, x, dy, variables


def _step(model):
    """Forward + backward: output, d/dx, d/dparams and the updated running statistics."""

    def step(variables, x, dy):
        def loss(params, x):
            y, upd = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(y * dy), (y, upd["batch_stats"])

        (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables["params"], x
        )
        return y, grads, stats

    return step


def _normalization_only(model):
    """Forward and input-gradient only (parameters fixed, statistics discarded)."""

    def f(variables, x, dy):
        y, vjp = jax.vjp(
            lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0], x
        )
        return y, vjp(dy)[0]

    return f


def test_ghost_batches_need_no_collectives_in_compiled_hlo(sharded_setup):
    mesh, x, dy, variables = sharded_setup
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def compiled(fn, out_shardings):
        jitted = jax.jit(fn, in_shardings=(rep, data, data), out_shardings=out_shardings)
        return jitted.lower(variables, x, dy).compile().as_text()

    gbn, bn = TwoLayer(GhostBatchNorm, ghost=4), TwoLayer(nn.BatchNorm)
    # Normalization forward and backward: no collective for GBN, several for BN.
    gbn_norm = collectives(compiled(_normalization_only(gbn), (data, data)))
    bn_norm = collectives(compiled(_normalization_only(bn), (data, data)))
    assert gbn_norm == []
    assert len(bn_norm) >= 2 * 2  # per layer: forward statistics and backward sums
    # Whole step: GBN keeps only the reductions of parameter gradients and running
    # statistics (XLA merges them into one all-reduce); BN adds its per-layer ones.
    gbn_step = collectives(compiled(_step(gbn), (data, rep, rep)))
    bn_step = collectives(compiled(_step(bn), (data, rep, rep)))
    assert len(gbn_step) < len(bn_step)
    # Any collective moving batch-sized arrays (XLA's choice for the first Dense layer's
    # weight gradient) is shared with the BN step, i.e. not caused by normalization.
    batch_sized = lambda ops: sorted(o for o in ops if {BATCH, BATCH // 8} & set(_dims(o[1])))
    assert batch_sized(gbn_step) == batch_sized(bn_step)
    # The running-statistics update alone: one small reduction of (features,) vectors.
    stats_only = jax.jit(
        lambda v, x, dy: _step(gbn)(v, x, dy)[2], in_shardings=(rep, data, data), out_shardings=rep
    )
    stats_ops = collectives(stats_only.lower(variables, x, dy).compile().as_text())
    assert stats_ops and all(op == "all-reduce" for op, _ in stats_ops)
    assert set(_dims(" ".join(shape for _, shape in stats_ops))) <= {12, 10}


def _dims(shape: str) -> list[int]:
    return [int(d) for dims in re.findall(r"\[([\d,]*)\]", shape) for d in dims.split(",") if d]


@pytest.mark.parametrize("ghost", [4, 16])  # within one device / spanning two devices
def test_sharded_equals_single_device(sharded_setup, ghost):
    mesh, x, dy, variables = sharded_setup
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step = _step(TwoLayer(GhostBatchNorm, ghost=ghost))
    sharded = jax.jit(step, in_shardings=(rep, data, data), out_shardings=(data, rep, rep))(
        variables, x, dy
    )
    single = jax.jit(step)(*jax.device_put((variables, x, dy), jax.devices()[0]))
    assert_trees_close(sharded, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ghost", [4, 16, None])
def test_shard_map_axis_name_equals_global(sharded_setup, ghost):
    """With axis_name, ghost batches are taken along the global batch (device order)."""
    mesh, x, dy, _ = sharded_setup
    module = GhostBatchNorm(momentum=0.9, ghost_batch_size=ghost, axis_name="data")
    h = x[:, :5] * 3 + 1
    v = _perturbed_variables(np.random.default_rng(0), 5)

    def local(v, h, dy):
        def loss(params, h):
            y, upd = module.apply(
                {**v, "params": params}, h, use_running_average=False, mutable=["batch_stats"]
            )
            return jnp.sum(y * dy), (y, upd["batch_stats"])

        (_, (y, stats)), (gp, gh) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            v["params"], h
        )
        return y, gh, gp, stats  # parameter gradients come out summed over devices

    mapped = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P("data"), P("data"), P(), P()),
        )
    )
    got = mapped(v, h, dy[:, :1] * h)
    ref = _loss_and_stats(module.clone(axis_name=None), v, h, dy[:, :1] * h)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], ref[2][1], rtol=1e-4, atol=1e-4)
    assert_trees_close(got[2], ref[2][0], rtol=1e-4, atol=1e-4)
    assert_trees_close(got[3], ref[1])


# --------------------------------------------------------------------------------------
# Explicit-axes sharding (jax.make_mesh(..., axis_types=Explicit) and jax.set_mesh).


@pytest.fixture(scope="module")
def explicit_mesh(devices):
    return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=devices)


# Ghost batches in a device, one each, 2 each, all; the split layout where pieces differ.
@pytest.mark.parametrize(
    "ghost,layout",
    [
        (4, "input"),
        (16, "input"),
        (32, "input"),
        (None, "input"),
        (16, "ghost_batches"),
        (32, "ghost_batches"),
    ],
)
def test_explicit_sharding_equals_single_device(sharded_setup, explicit_mesh, ghost, layout):
    _, _, _, variables = sharded_setup
    rng = np.random.default_rng(19)
    batch = 128  # 16 examples per device
    x, dy, tangent = (
        jnp.asarray(rng.normal(size=(batch, d)) * 2 + 0.5, jnp.float32) for d in (7, 3, 7)
    )
    model = TwoLayer(GhostBatchNorm, ghost=ghost, layout=layout)
    step = _step(model)
    forward = lambda v, x, t: jax.jvp(
        lambda x: model.apply(v, x, train=True, mutable=["batch_stats"])[0], (x,), (t,)
    )[1]
    single, single_jvp = jax.jit(step)(variables, x, dy), jax.jit(forward)(variables, x, tangent)
    with jax.set_mesh(explicit_mesh):
        x_s, dy_s, t_s = (jax.device_put(a, P("data")) for a in (x, dy, tangent))
        sharded = jax.jit(step)(variables, x_s, dy_s)
        assert jax.typeof(sharded[0]).sharding.spec[0] == "data"
        sharded_jvp = jax.jit(forward)(variables, x_s, t_s)
        hlo = jax.jit(_normalization_only(model)).lower(variables, x_s, dy_s).compile().as_text()
    assert_trees_close(sharded, single, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded_jvp, single_jvp, rtol=1e-5, atol=1e-5)
    # Only per-ghost-batch sums cross devices, never activations; nothing at all when
    # every ghost batch is on one device.
    ops = collectives(hlo)
    if ghost is not None and ghost <= batch // 8:
        assert ops == []
    assert not {batch, batch // 8} & set(_dims(" ".join(shape for _, shape in ops)))


@pytest.mark.parametrize("ghost", [4, 32])  # in a device, and two devices per ghost batch
def test_explicit_sharding_of_an_image_input_equals_single_device(explicit_mesh, ghost):
    """The per-example statistics of an input with spatial axes keep the batch sharding."""
    rng = np.random.default_rng(23)
    x, dy = (jnp.asarray(rng.normal(size=(128, 3, 5)) * 2 + 0.5, jnp.float32) for _ in "xy")
    module = GhostBatchNorm(ghost_batch_size=ghost, momentum=0.9)
    variables = _perturbed_variables(rng, 5)
    step = jax.jit(lambda v, x, dy: _loss_and_stats(module, v, x, dy))
    single = step(variables, x, dy)
    with jax.set_mesh(explicit_mesh):
        x_s, dy_s = (jax.device_put(a, P("data")) for a in (x, dy))
        sharded = step(variables, x_s, dy_s)
        assert jax.typeof(sharded[0]).sharding.spec[0] == "data"
        hlo = step.lower(variables, x_s, dy_s).compile().as_text()
    assert_trees_close(sharded, single, rtol=1e-5, atol=1e-5)
    # Each example meets its ghost batch's statistics on its own device: only
    # statistics-sized arrays cross devices.
    assert not {128, 16} & set(_dims(" ".join(shape for _, shape in collectives(hlo))))


def test_explicit_sharding_rejects_ghost_batches_straddling_devices(explicit_mesh):
    x = jnp.ones((48, 3))  # 6 examples per device
    # Jitted: the check runs while tracing, and one compile replaces one per operation.
    init = lambda ghost, x: jax.jit(
        GhostBatchNorm(use_running_average=False, ghost_batch_size=ghost).init
    )(jax.random.key(0), x)
    with jax.set_mesh(explicit_mesh):
        x_s = jax.device_put(x, P("data"))
        with pytest.raises(ValueError, match=r"sharded over 8 devices.*6 examples.*divides 6"):
            init(4, x_s)
        for ghost in (3, 12):  # a divisor, and two devices per ghost batch
            init(ghost, x_s)


# --------------------------------------------------------------------------------------
# Batches that are not a multiple of the ghost size (remainder="own_ghost_batch").


def remainder_sizes(batch, ghost):
    """Ghost batch sizes by the documented rule: the last batch % ghost examples form a
    ghost batch of their own, unless they are a single example, which joins the one
    before."""
    full, rest = divmod(batch, ghost)
    if rest == 0:
        return [ghost] * full
    return [ghost] * full + [rest] if rest >= 2 else [ghost] * (full - 1) + [ghost + rest]


def np_sized_ghost_bn(x, scale, bias, rm, rv, *, sizes, momentum=0.9, update, mask=None):
    """Batch norm per contiguous group of the given sizes, float64, features last, with
    one EMA step per group in order ("sequential") or one with the averages ("mean")."""
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    reduce_axes = tuple(range(x.ndim - 1))
    y, means, variances, seen, start = np.empty_like(x), [], [], [], 0
    for size in sizes:
        rows = slice(start, start + size)
        start += size
        xs, ms = x[rows], m[rows]
        count = ms.sum(reduce_axes)
        mu = np.where(ms, xs, 0).sum(reduce_axes) / np.maximum(count, 1)
        var = np.where(ms, (xs - mu) ** 2, 0).sum(reduce_axes) / np.maximum(count, 1)
        y[rows] = (xs - mu) / np.sqrt(var + EPS) * scale + bias
        means.append(mu), variances.append(var), seen.append(count > 0)
    assert start == x.shape[0]
    rm, rv = np_running_update(rm, rv, means, variances, seen, momentum, update)
    return y, rm, rv


def jnp_sized_ghost_bn(x, scale, bias, sizes, mask=None):
    """The same normalization in plain jnp, features last, for jax.grad and jax.jvp."""
    m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    reduce_axes = tuple(range(x.ndim - 1))
    ys, start = [], 0
    for size in sizes:
        xs, ms = x[start : start + size], m[start : start + size]
        start += size
        count = jnp.maximum(ms.sum(reduce_axes), 1)
        mu = jnp.where(ms, xs, 0).sum(reduce_axes) / count
        var = jnp.where(ms, jnp.square(xs - mu), 0).sum(reduce_axes) / count
        ys.append((xs - mu) / jnp.sqrt(var + EPS) * scale + bias)
    return jnp.concatenate(ys)


REMAINDER_CASES = [  # (shape, ghost): remainders of 2, 1 (joins), 3, 1 with one full ghost
    ((10, 5), 4),
    ((9, 5), 4),
    ((11, 3, 3, 4), 4),  # conv NHWC
    ((13, 2, 3), 3),
    ((5, 6), 4),
    ((7, 2, 2, 3), 2),
]


@pytest.mark.parametrize("shape,ghost", REMAINDER_CASES)
@pytest.mark.parametrize("masked", [None, "examples", "entries", "features"])
def test_remainder_matches_numpy_outputs_and_running_statistics(shape, ghost, masked):
    """Outputs and running statistics (both updates, both variance formulas) equal the
    numpy reference with the documented ghost batch sizes, with and without a mask."""
    rng = np.random.default_rng(shape[0] * 10 + ghost + len(str(masked)))
    x, scale, bias, rm, rv = random_inputs(rng, shape, shape[-1])
    sizes = remainder_sizes(shape[0], ghost)
    firsts = np.cumsum([0, *sizes[:-1]])
    mask = None
    if masked == "examples":  # per example; each ghost batch keeps its first two
        mask = rng.random(shape[0]) < 0.6
        mask[firsts] = mask[firsts + 1] = True
        mask = mask.reshape(-1, *[1] * (len(shape) - 1))
    elif masked == "entries":  # elementwise
        mask = rng.random(shape) < 0.6
        mask[firsts] = mask[firsts + 1] = True
    elif masked == "features":  # broadcast over the batch: whole features left out
        mask = rng.random(shape[-1]) < 0.6
        mask[0] = True
    for update, fast in (("sequential", True), ("mean", False)):
        y, new_m, new_v = ghost_batch_norm(
            jnp.asarray(x),
            scale,
            bias,
            rm,
            rv,
            use_running_average=False,
            ghost_batch_size=ghost,
            remainder="own_ghost_batch",
            running_update=update,
            momentum=0.9,
            use_fast_variance=fast,
            mask=mask,
        )
        ry, rm2, rv2 = np_sized_ghost_bn(
            x, scale, bias, rm, rv, sizes=sizes, update=update, mask=mask
        )
        np.testing.assert_allclose(y, ry, rtol=1e-4, atol=2e-4, err_msg=f"{update=}")
        np.testing.assert_allclose(new_m, rm2, rtol=1e-5, atol=1e-5, err_msg=f"{update=}")
        np.testing.assert_allclose(new_v, rv2, rtol=1e-5, atol=1e-5, err_msg=f"{update=}")


def test_remainder_running_update_closed_form():
    """k full ghost batches and one smaller: new = m**(k+1) old + sum_j (1-m) m**(k+1-j)
    stat_j, each ghost batch's statistics from its own examples."""
    rng = np.random.default_rng(41)
    x = rng.normal(size=(14, 3)) * 2 + 1  # ghost 4: 4, 4, 4 and a remainder of 2
    old = rng.normal(size=3)
    _, new_mean, _ = ghost_batch_norm(
        jnp.asarray(x, jnp.float32),
        None,
        None,
        jnp.asarray(old, jnp.float32),
        jnp.ones(3),
        use_running_average=False,
        ghost_batch_size=4,
        remainder="own_ghost_batch",
        momentum=0.8,
    )
    stats = [x[0:4].mean(0), x[4:8].mean(0), x[8:12].mean(0), x[12:14].mean(0)]
    expected = 0.8**4 * old + sum(0.2 * 0.8 ** (3 - j) * s for j, s in enumerate(stats))
    np.testing.assert_allclose(new_mean, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,ghost", [((10, 3), 4), ((9, 2, 2, 3), 4), ((7, 3), 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_remainder_gradients_and_forward_mode_match_plain_jnp(shape, ghost, masked):
    """jax.grad (reverse mode through the custom rule) and jax.jvp equal those of the
    plain-jnp reference differentiated by JAX itself."""
    rng = np.random.default_rng(43 + shape[0] + masked)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=shape[-1]), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    sizes = remainder_sizes(shape[0], ghost)
    mask = None
    if masked:
        rows = rng.random(shape[0]) < 0.7
        rows[np.cumsum([0, *sizes[:-1]])] = rows[np.cumsum([1, *sizes[:-1]])] = True
        mask = jnp.asarray(rows.reshape(-1, *[1] * (len(shape) - 1)))
    module = GhostBatchNorm(
        ghost_batch_size=ghost, remainder="own_ghost_batch", use_running_average=False
    )
    variables = {
        "params": {"scale": scale, "bias": bias},
        "batch_stats": {"mean": jnp.zeros(shape[-1]), "var": jnp.ones(shape[-1])},
    }

    def ours(x, scale, bias):
        v = {**variables, "params": {"scale": scale, "bias": bias}}
        return module.apply(v, x, mutable=["batch_stats"], mask=mask)[0]

    ref = lambda x, scale, bias: jnp_sized_ghost_bn(x, scale, bias, sizes, mask)
    loss = lambda f: lambda *args: jnp.sum(jnp.tanh(f(*args)) * w)
    grads = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(x, scale, bias)
    assert_trees_close(grads, jax.jit(jax.grad(loss(ref), (0, 1, 2)))(x, scale, bias), atol=1e-4)
    tangents = tuple(jnp.asarray(rng.normal(size=a.shape), jnp.float32) for a in (x, scale, bias))
    jvp = lambda f: jax.jit(lambda p, t: jax.jvp(f, p, t))((x, scale, bias), tangents)
    (_, dy), (_, ref_dy) = jvp(ours), jvp(ref)
    np.testing.assert_allclose(dy, ref_dy, rtol=1e-4, atol=1e-4)


def test_remainder_default_is_the_error_and_inference_ignores_it():
    rng = np.random.default_rng(47)
    x = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
    module = GhostBatchNorm(ghost_batch_size=4, momentum=0.9)
    variables = module.init(jax.random.key(0), x, use_running_average=True)
    with pytest.raises(ValueError, match=r"\(10\).*\(4\).*remainder='own_ghost_batch'"):
        module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    # A batch that is a multiple is untouched by the mode: the same bits.
    own = module.clone(remainder="own_ghost_batch")
    for a, b in zip(
        jax.tree.leaves(own.apply(variables, x[:8], use_running_average=False, mutable=True)),
        jax.tree.leaves(module.apply(variables, x[:8], use_running_average=False, mutable=True)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        own.apply(variables, x, use_running_average=True),
        module.apply(variables, x, use_running_average=True),
    )
    with pytest.raises(ValueError, match="remainder='pad'"):
        GhostBatchNorm(ghost_batch_size=4, remainder="pad")
    with pytest.raises(ValueError, match=r"momentum=1\.5"):
        GhostBatchNorm(momentum=1.5)


def test_remainder_under_axis_name_or_explicit_sharding_is_rejected(sharded_setup, explicit_mesh):
    """Unequal ghost batches cannot be split over devices: a clear error instead."""
    mesh = sharded_setup[0]
    module = GhostBatchNorm(
        ghost_batch_size=3, remainder="own_ghost_batch", axis_name="data", momentum=0.9
    )
    x = jnp.asarray(np.random.default_rng(53).normal(size=(64, 3)), jnp.float32)
    variables = module.init(jax.random.key(0), x[:8], use_running_average=True)
    local = lambda v, x: module.apply(v, x, use_running_average=False, mutable=True)[0]
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    with pytest.raises(ValueError, match=r"per-device batch size \(8\).*not available"):
        mapped(variables, x)
    with jax.set_mesh(explicit_mesh):
        x_s = jax.device_put(jnp.ones((40, 3)), P("data"))
        with pytest.raises(ValueError, match=r"sharded over 8 devices.*mask"):
            module.clone(axis_name=None).apply(variables, x_s, use_running_average=False)


def test_one_definition_of_the_ghost_fields():
    """The linen module, the NNX module, ghost_batch_norm and ghostify take the fields
    of GhostOptions with its defaults, and every field has one description."""
    import dataclasses
    import inspect

    from gbn_jax import ghostify as ghostify_function
    from gbn_jax import nnx as gbn_nnx
    from gbn_jax.ghost_norm import FIELD_DOCS, GhostOptions

    ghostify_module = inspect.getmodule(ghostify_function)
    defaults = {f.name: f.default for f in dataclasses.fields(GhostOptions)}
    linen_fields = {f.name: f.default for f in dataclasses.fields(GhostBatchNorm)}
    signatures = [
        inspect.signature(f).parameters
        for f in (
            gbn_nnx.GhostBatchNorm.__init__,
            ghost_batch_norm,
            ghostify_module.ghost_batch_norm_scope,
            ghostify_module.ghostify,
            ghostify_module.ghostify_nnx,
        )
    ]
    for name, default in defaults.items():
        assert linen_fields[name] == default, name
        assert name in FIELD_DOCS and name in GhostOptions.__doc__
        for params in signatures:
            if params[name].default is not inspect.Parameter.empty:
                assert params[name].default == default, name
    for name in linen_fields:
        if name not in ("parent", "name"):
            assert name in FIELD_DOCS and name in GhostBatchNorm.__doc__, name
