"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, Algorithm 1) for Flax.

A large batch is split into contiguous "ghost" batches of ``ghost_batch_size`` examples
along the leading axis; each ghost batch is normalized with its own mean and biased
variance, so large-batch training sees the normalization noise of small-batch training.
Because the groups are contiguous, a ghost batch lives on a single device whenever the
per-device batch is a multiple of the ghost size, and normalization then needs no
cross-device communication at all.

Running statistics ("sequential", the default) are updated as if the ghost batches had
been seen one after another by an ordinary batch norm with Flax's exponential moving
average ``new = m * old + (1 - m) * stat``. For k ghost batches this is the closed form

    new = m**k * old + sum_{j=1..k} (1 - m) * m**(k - j) * stat_j,

evaluated in one vectorized step. The printed Algorithm 1 writes the first exponent as
|B_S| (the ghost size); the correct exponent is the number of ghost batches k, which is
what is implemented. The paper tracks a running standard deviation; like
``flax.linen.BatchNorm`` this module tracks the running (biased) variance, so checkpoints
are interchangeable with ``nn.BatchNorm``. ``running_update="mean"`` instead makes one
update with the average of the ghost means and the average of the ghost variances (the
semantics of tf.keras ``virtual_batch_size``, but with contiguous groups).

References:
  Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017, Section 4
  ("Ghost Batch Normalization"), Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes
from flax.typing import Array, Dtype, Initializer
from jax import lax
from jax.sharding import PartitionSpec as P

RUNNING_UPDATES = ("sequential", "mean")


def _canonicalize_axes(rank: int, axes: int | Iterable[int]) -> tuple[int, ...]:
    if rank == 0:
        raise ValueError(
            "GhostBatchNorm needs an input with at least one axis, got a scalar; pass a "
            "batch, e.g. x[None]."
        )
    axes = tuple(axes) if isinstance(axes, Iterable) else (axes,)
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"Feature axis {a} is out of range for an input of rank {rank} ({axes=}); "
                f"use axes in [{-rank}, {rank - 1}], e.g. axis=-1 for features last."
            )
    return tuple(sorted({a % rank for a in axes}))


def _abs_sq(v: Array) -> Array:
    """|v|^2 elementwise: the variance of complex inputs is real, as in flax.linen."""
    if jnp.iscomplexobj(v):
        return lax.square(lax.real(v)) + lax.square(lax.imag(v))
    return lax.square(v)


def _check_config(ghost_batch_size: Any, running_update: Any, momentum: float) -> None:
    if ghost_batch_size is not None and (
        isinstance(ghost_batch_size, bool)
        or not isinstance(ghost_batch_size, int | np.integer)
        or ghost_batch_size < 1
    ):
        raise ValueError(
            f"ghost_batch_size must be None or a positive integer, got {ghost_batch_size=}; "
            "pass e.g. ghost_batch_size=128, or None for ordinary batch norm."
        )
    if running_update not in RUNNING_UPDATES:
        raise ValueError(
            f"Unknown {running_update=}; use one of {RUNNING_UPDATES} ('sequential' is "
            "Algorithm 1 of the paper, 'mean' averages the ghost statistics)."
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum=}.")


def _num_groups(batch: int, ghost_batch_size: int | None, where: str) -> int:
    """Number of contiguous ghost batches in a batch of ``batch`` examples."""
    if ghost_batch_size is None or ghost_batch_size >= batch:
        return 1
    if batch % ghost_batch_size:
        raise ValueError(
            f"The {where} ({batch}) is not a multiple of ghost_batch_size "
            f"({ghost_batch_size}). Pad the batch to a multiple of {ghost_batch_size} "
            f"(e.g. {-(-batch // ghost_batch_size) * ghost_batch_size} examples) and pass "
            "`mask` marking the padding False, or choose a ghost_batch_size that divides "
            f"{batch}."
        )
    return batch // ghost_batch_size


def _grouped_mask(mask: Array | None, x_shape: tuple[int, ...], groups: int) -> Array | None:
    """Reshapes ``mask`` (broadcastable to x) to broadcast against the grouped input."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    try:
        fits = jnp.broadcast_shapes(mask.shape, x_shape) == tuple(x_shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask shape {mask.shape} does not broadcast to the input shape {x_shape}; "
            "give it the input's rank with size-1 axes, e.g. mask[:, None] for a dense "
            "input or mask[:, None, None, None] for NHWC."
        )
    mask = mask.reshape((1,) * (len(x_shape) - mask.ndim) + mask.shape)
    if mask.shape[0] == 1:
        return mask[None]
    return mask.reshape((groups, x_shape[0] // groups, *mask.shape[1:]))


def _sequential_weights(
    nonempty: Array | None, groups: int, momentum: float, dtype: Dtype
) -> tuple[Array, Array]:
    """Weights (m**k, [(1 - m) * m**(k - j)]_j) of the closed-form sequential update.

    Empty ghost batches (every example masked) are skipped, as if never seen.
    """
    if nonempty is None:
        after = np.arange(groups - 1, -1, -1, dtype=np.float64)
        weights = (1.0 - momentum) * momentum**after
        decay = momentum**groups
        return jnp.asarray(decay, dtype), jnp.asarray(weights, dtype).reshape(groups, 1)
    e = nonempty.astype(dtype)
    total = e.sum(0)
    after = total - jnp.cumsum(e, axis=0)
    return momentum**total, e * (1.0 - momentum) * momentum**after


def _update_running(
    old: Array,
    stats: Array,
    nonempty: Array | None,
    momentum: float,
    running_update: str,
) -> Array:
    """One running-statistics update from per-ghost-batch statistics of shape (k, F).

    The result has the promoted dtype of ``old`` and ``stats``, as Flax's update
    ``m * old + (1 - m) * stat`` has (a complex mean keeps its imaginary part).
    """
    groups = stats.shape[0]
    flat_old = old.reshape(-1)
    real = jnp.finfo(stats.dtype).dtype
    if running_update == "sequential":
        decay, weights = _sequential_weights(nonempty, groups, momentum, real)
        new = decay * flat_old + jnp.sum(weights * stats, axis=0)
    elif nonempty is None:
        new = momentum * flat_old + (1.0 - momentum) * jnp.mean(stats, axis=0)
    else:
        e = nonempty.astype(real)
        seen = e.sum(0)
        avg = jnp.sum(e * stats, axis=0) / jnp.maximum(seen, 1.0)
        new = jnp.where(seen > 0, momentum * flat_old + (1.0 - momentum) * avg, flat_old)
    return new.reshape(old.shape).astype(jnp.result_type(old.dtype, stats.dtype))


def _cross_device(
    sums: tuple[Array, ...], axis_name: str | None, span: int, axis_index_groups: Any
) -> tuple[Array, ...]:
    """Adds up per-device sums (ghost batches on axis 0) over the devices sharing one.

    ``span`` is the number of consecutive devices per ghost batch: 1 means every ghost
    batch is local (nothing to do), 0 means one ghost batch over all devices.
    """
    if axis_name is None or span == 1:
        return sums
    if len({v.dtype for v in sums}) > 1:  # complex sums next to real ones
        return tuple(
            out for v in sums for out in _cross_device((v,), axis_name, span, axis_index_groups)
        )
    stacked = jnp.stack(sums)  # one collective for all statistics
    if span == 0:  # one ghost batch over every device: ordinary distributed batch norm
        return tuple(lax.psum(stacked, axis_name, axis_index_groups=axis_index_groups))
    every = lax.all_gather(stacked, axis_name, axis=1, tiled=True)
    every = every.reshape(every.shape[0], -1, span, *every.shape[2:]).sum(2)
    own = lax.dynamic_slice_in_dim(every, lax.axis_index(axis_name) // span, 1, axis=1)
    return tuple(own)


def _explicit_batch_shards(x: Array) -> tuple[int, tuple[str, ...]]:
    """Shards of the leading axis over explicit mesh axes (``jax.set_mesh``), and their names.

    With ``AxisType.Explicit`` the sharding is part of the type and every reshape must
    keep it expressible; with Auto axes (or none) XLA places data itself and this is 1.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return 1, ()
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return int(np.prod([sharding.mesh.shape[n] for n in names])), names


def _sum_consecutive(sums: tuple[Array, ...], per: int) -> tuple[Array, ...]:
    """Sums of ``per`` consecutive pieces (axis 0), repeated for each of them.

    For a ghost batch spread over ``per`` shards of an explicit mesh: the small per-shard
    sums are gathered (replicated), added up per ghost batch and broadcast back.
    """
    out = []
    for v in sums:
        full = jax.sharding.reshard(v, P())
        total = full.reshape(-1, per, *full.shape[1:]).sum(1, keepdims=True)
        out.append(jnp.broadcast_to(total, (total.shape[0], per, *full.shape[1:])).reshape(v.shape))
    return tuple(out)


def _global_ghost_batches(stats: Array, axis_name: str, span: int) -> Array:
    """Per-ghost-batch statistics (axis 1) of the whole global batch, in device order.

    Each device writes its own ghost batches into a zero buffer at their global position
    and one psum assembles the result (which is then the same on every device).
    """
    device = lax.axis_index(axis_name)
    local = stats.shape[1]
    if span == 1:
        rows, start = lax.axis_size(axis_name) * local, device * local
    else:  # `span` devices share each ghost batch: the first of them writes it
        rows, start = lax.axis_size(axis_name) // span, device // span
        stats = jnp.where(device % span == 0, stats, 0)
    buffer = jnp.zeros((stats.shape[0], rows, *stats.shape[2:]), stats.dtype)
    return lax.psum(lax.dynamic_update_slice_in_dim(buffer, stats, start, axis=1), axis_name)


def _varying_like(param: Array, x: Array) -> Array:
    """Marks a replicated parameter as varying over the manual mesh axes x varies over.

    Inside shard_map, autodiff then sums its per-device gradients (the transpose of
    the cast), as it does for nn.BatchNorm, although our VJP is hand-written.
    """
    missing = tuple(sorted(_varying_axes(x) - _varying_axes(param)))
    return lax.pcast(param, missing, to="varying") if missing else param


def _varying_axes(v: Array) -> frozenset:
    aval = jax.typeof(v)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older: `.vma`
    return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def _group_normalizer(
    red: tuple[int, ...],
    epsilon: float,
    use_fast_variance: bool,
    stat_dtype: Dtype,
    out_dtype: Dtype,
    combine: Callable[..., tuple[Array, ...]],
) -> Callable[..., tuple[Array, Array, Array, Array]]:
    """Builds ``normalize(xg, scale, bias, mask) -> (y, mean, var, count)`` per group.

    ``xg`` has the ghost batches on axis 0; ``red`` are the axes reduced for statistics;
    ``scale``, ``bias`` broadcast against ``xg`` (or are None); ``mask`` is None or a
    boolean array broadcastable to ``xg``; ``combine`` adds up sums of a ghost batch that
    is spread over several devices.

    The derivative is a hand-written JVP rule (``jax.custom_jvp``), so forward mode
    (``jax.jvp``, ``jax.jacfwd``, Hessian-vector products) works. Reverse mode is JAX's
    transpose of that rule, which is written so that the transpose costs what
    nn.BatchNorm's backward does: one fused reduction over (dy, x - mean) per ghost
    batch and one elementwise pass for dx (autodiff through the statistics would add
    grouped reductions, slow on XLA:CPU). Complex inputs are differentiated by plain
    autodiff instead.
    """
    real_dtype = jnp.finfo(stat_dtype).dtype

    def masked(v: Array, mask: Array | None) -> Array:
        return v if mask is None else jnp.where(mask, v, 0)

    def group_sum(v: Array, mask: Array | None = None) -> Array:
        return masked(v, mask).sum(red, keepdims=True)

    def forward(xg, scale, bias, mask):
        """Outputs and the values the tangent rule needs."""
        xf = xg.astype(stat_dtype)
        s1 = group_sum(xf, mask)
        if mask is None:
            local_count = float(np.prod([xg.shape[a] for a in red]))
            count = jnp.full(s1.shape, local_count, real_dtype)
        else:
            missing = np.prod([xg.shape[a] for a in red if mask.shape[a] == 1])
            count = group_sum(mask.astype(real_dtype)) * missing
            count = jnp.broadcast_to(count, s1.shape)
        if use_fast_variance:
            s1, s2, count = combine(s1, group_sum(_abs_sq(xf), mask), count)
            n = jnp.maximum(count, 1.0)
            mean = s1 / n
            var = jnp.maximum(0.0, s2 / n - _abs_sq(mean))
        else:
            s1, count = combine(s1, count)
            n = jnp.maximum(count, 1.0)
            mean = s1 / n
            (s2,) = combine(group_sum(_abs_sq(xf - mean), mask))
            var = s2 / n
        inv_std = lax.rsqrt(var + epsilon)
        mul = inv_std if scale is None else inv_std * scale
        centred = xf - mean
        y = centred * mul
        if bias is not None:
            y = y + bias
        return (y.astype(out_dtype), mean, var, count), (centred, inv_std, mul, n)

    def tangents(primals, tangents):
        """d(y, mean, var, count) for tangents (dx, dscale, dbias) of (x, scale, bias).

        With c = x - mean: dmean = sum(dx) / n, dvar = 2 sum(c dx) / n and
        dy = mul (dx - dmean) - (mul / 2) inv_std**2 dvar c + inv_std c dscale + dbias,
        written as mul * dx + c * a + b with per-group a and b, so that the transpose
        (reverse mode) needs only the per-group sums of dy and of dy * c.
        """
        xg, scale, bias, mask = primals
        dx, dscale, dbias, _ = tangents
        outputs, (centred, inv_std, mul, n) = forward(xg, scale, bias, mask)
        if dx.dtype == jax.dtypes.float0:  # integer input
            dx = jnp.zeros(xg.shape, stat_dtype)
        dxf = dx.astype(stat_dtype)
        # The order of the terms and where the signs sit are chosen so that XLA:CPU
        # compiles the transpose to the rounding of the hand-written VJP this rule
        # replaced (F1 train steps stay bit-identical): dx = mul * dy + (c * a' - b')
        # with the negation applied last to b'.
        dy = mul * dxf
        # Masked examples are outside the statistics, but their outputs use them.
        sum_dx, sum_c_dx = combine(group_sum(dxf, mask), group_sum(masked(centred, mask) * dxf))
        d_mean = sum_dx / n
        d_var = (2.0 * sum_c_dx) / n
        per_centred = ((0.5 * mul) * lax.square(inv_std)) * -d_var
        if scale is not None:
            per_centred = per_centred + inv_std * dscale
        per_group = mul * (-sum_dx / n)
        if bias is not None:
            per_group = per_group + dbias
        dy = dy + centred * per_centred + per_group
        count = outputs[3]
        return outputs, (dy.astype(out_dtype), d_mean, d_var, jnp.zeros_like(count))

    def primal(xg, scale, bias, mask):
        return forward(xg, scale, bias, mask)[0]

    if jnp.issubdtype(stat_dtype, jnp.complexfloating):
        return primal
    normalize = jax.custom_jvp(primal)
    normalize.defjvp(tangents)
    return normalize


def ghost_batch_norm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    running_mean: Array,
    running_var: Array,
    *,
    use_running_average: bool,
    ghost_batch_size: int | None = None,
    running_update: str = "sequential",
    axis: int | Iterable[int] = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    force_float32_reductions: bool = True,
    mask: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Ghost batch normalization: the functional core shared by linen and NNX.

    Training (``use_running_average=False``) splits the leading axis into contiguous
    ghost batches of ``ghost_batch_size`` examples, normalizes each with its own mean
    and biased variance (over every axis except the feature axes, masked examples left
    out) and returns running statistics updated once per ghost batch. Inference uses the
    running statistics for the whole batch, never splits, and accepts any batch size.

    Args:
      x: input; the batch is the leading axis.
      scale: gamma, shape of the feature axes, or None for no scale.
      bias: beta, shape of the feature axes, or None for no bias.
      running_mean: running mean, shape of the feature axes.
      running_var: running (biased) variance, shape of the feature axes.
      use_running_average: normalize with the running statistics (inference).
      ghost_batch_size: examples per ghost batch; None, or a size >= the batch, is
        ordinary batch norm over the whole batch. A larger batch must be a multiple.
      running_update: "sequential" (Algorithm 1: one EMA step per ghost batch, in
        order) or "mean" (one EMA step with the averaged ghost statistics).
      axis: feature axis or axes (not the leading axis when the batch is split).
      momentum: EMA decay m of the running statistics (Flax convention).
      epsilon: added to the variance before the square root.
      dtype: output dtype (default: inferred from x, scale and bias, as nn.BatchNorm).
      axis_name: named mapped axis (shard_map) whose devices hold consecutive slices of
        one global batch; ghost batches are taken along that global batch.
      axis_index_groups: device groups for ``axis_name``; only with one ghost batch.
      use_fast_variance: variance as E[x^2] - E[x]^2 in one pass over x.
      force_float32_reductions: compute statistics in at least float32.
      mask: boolean array broadcastable to x; False entries are left out of their
        ghost batch's statistics. A ghost batch with nothing unmasked is skipped by the
        running update.

    Returns:
      ``(y, new_running_mean, new_running_var)``; with ``use_running_average`` the
      running statistics come back unchanged.

    Raises:
      ValueError: for a batch that is not a multiple of ``ghost_batch_size``, an
        unknown ``running_update`` or an invalid mask, ghost size, axis or momentum.

    References:
      Hoffer et al. 2017, Section 4, Algorithm 1 (Ghost Batch Normalization).
    """
    _check_config(ghost_batch_size, running_update, momentum)
    x = jnp.asarray(x)
    ndim = x.ndim
    feature_axes = _canonicalize_axes(ndim, axis)
    out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype)
    stat_dtype = jnp.result_type(x) if dtype is None else dtype
    if force_float32_reductions:
        stat_dtype = jnp.promote_types(stat_dtype, jnp.float32)

    def as_features(v: Array, rank: int) -> Array:
        shape = [1] * rank
        for a in feature_axes:
            shape[a + rank - ndim] = x.shape[a]
        return jnp.asarray(v).reshape(shape)

    def affine(xs: Array, mean: Array, var: Array) -> Array:
        # Scale folds into the per-group multiplier, so the output is one fused
        # subtract-multiply-add over the activations, exactly as in nn.BatchNorm.
        mul = lax.rsqrt(var + epsilon)
        if scale is not None:
            s = as_features(scale, xs.ndim)
            mul = mul * (s if force_float32_reductions else s.astype(scale.dtype))
        y = (xs - mean) * mul
        if bias is not None:
            b = as_features(bias, xs.ndim)
            y = y + (b if force_float32_reductions else b.astype(bias.dtype))
        return y

    if use_running_average:
        rm, rv = running_mean, running_var
        if not force_float32_reductions and scale is not None:
            rm, rv = rm.astype(scale.dtype), rv.astype(scale.dtype)
        y = affine(x, as_features(rm, ndim), as_features(rv, ndim))
        return y.astype(out_dtype), running_mean, running_var

    batch = x.shape[0]
    devices = 1 if axis_name is None else lax.axis_size(axis_name)
    if axis_index_groups is not None and ghost_batch_size is not None:
        raise ValueError(
            f"{axis_index_groups=} is only supported with ghost_batch_size=None; ghost "
            "batches already define which examples share statistics."
        )
    if 0 in feature_axes and ghost_batch_size is not None and ghost_batch_size < batch * devices:
        raise ValueError(
            f"Ghost batches split the leading axis, but here it is a feature axis ({axis=}, "
            f"input shape {x.shape}{'; a 1-D input has no batch axis' if ndim == 1 else ''}). "
            "Put the batch first with the features elsewhere (e.g. axis=-1), or use "
            "ghost_batch_size=None for ordinary batch norm."
        )
    # `span`: devices sharing one ghost batch (0: all of them, 1: ghost batches local).
    if axis_name is None:
        groups, span = _num_groups(batch, ghost_batch_size, "batch size"), 1
    elif ghost_batch_size is None or ghost_batch_size >= batch * devices:
        groups, span = 1, 0
    elif ghost_batch_size <= batch:
        groups, span = _num_groups(batch, ghost_batch_size, "per-device batch size"), 1
    else:
        _num_groups(batch * devices, ghost_batch_size, "global batch size")
        if ghost_batch_size % batch:
            raise ValueError(
                f"ghost_batch_size ({ghost_batch_size}) spans several devices but is not a "
                f"multiple of the per-device batch size ({batch}); use a ghost size that "
                "is a multiple or a divisor of the per-device batch."
            )
        groups, span = 1, ghost_batch_size // batch
    combine = lambda *sums: _cross_device(sums, axis_name, span, axis_index_groups)

    # Under an explicit mesh a reshape must keep the batch sharding expressible: a
    # ghost batch spread over `per` shards is cut into one piece per shard, and the
    # pieces' (small) sums are added up across shards.
    pieces, per = groups, 1
    shards, mesh_axes = _explicit_batch_shards(x) if axis_name is None else (1, ())
    if groups > 1 and groups % shards and shards % groups:
        raise ValueError(
            f"The batch ({batch}) is sharded over {shards} devices (explicit mesh axes "
            f"{mesh_axes}), {batch // shards} examples each, and ghost batches of "
            f"{ghost_batch_size} would straddle devices; use a ghost_batch_size that "
            f"divides {batch // shards} or is a multiple of it."
        )
    if 1 < groups < shards:
        pieces, per = shards, shards // groups
        combine = lambda *sums: _sum_consecutive(sums, per)

    xg = x.reshape(pieces, batch // pieces, *x.shape[1:])
    # Statistics reduce the examples of a ghost batch (axis 1 of xg, unless the leading
    # axis holds features) and every other non-feature axis.
    red = tuple(a + 1 for a in range(ndim) if a not in feature_axes)
    normalize = _group_normalizer(red, epsilon, use_fast_variance, stat_dtype, out_dtype, combine)
    y, mean, var, count = normalize(
        xg,
        None if scale is None else _varying_like(as_features(scale, ndim + 1), x),
        None if bias is None else _varying_like(as_features(bias, ndim + 1), x),
        _grouped_mask(mask, x.shape, pieces),
    )
    y = y.reshape(x.shape)
    if per > 1:  # one copy of each ghost batch's statistics
        mean, var, count = mean[::per], var[::per], count[::per]

    # The running update follows the global order of ghost batches, so under a named
    # axis it needs every device's ghost-batch statistics (small arrays, one psum).
    if axis_name is not None and span != 0:
        mean, var, count = _global_ghost_batches(jnp.stack([mean, var, count]), axis_name, span)
    k = mean.shape[0]
    nonempty = None if mask is None else (count > 0).reshape(k, -1)
    new_mean = _update_running(
        running_mean, mean.reshape(k, -1), nonempty, momentum, running_update
    )
    new_var = _update_running(running_var, var.reshape(k, -1), nonempty, momentum, running_update)
    return y, new_mean, new_var


class GhostBatchNorm(nn.Module):
    """Ghost Batch Normalization, a drop-in replacement for ``flax.linen.BatchNorm``.

    Fields, defaults and variables (``params/scale``, ``params/bias``,
    ``batch_stats/mean``, ``batch_stats/var``) are those of ``nn.BatchNorm``, so models
    can swap one for the other and keep their checkpoints. ``ghost_batch_size=None`` (or
    a size >= the batch) is exactly ``nn.BatchNorm``. As in ``nn.BatchNorm`` the running
    statistics are not updated while initializing.

    Example:

      >>> import jax, jax.numpy as jnp
      >>> from gbn_jax import GhostBatchNorm
      >>> gbn = GhostBatchNorm(ghost_batch_size=4, momentum=0.9)
      >>> x = jax.random.normal(jax.random.key(0), (16, 3))
      >>> variables = gbn.init(jax.random.key(1), x, use_running_average=False)
      >>> y, updates = gbn.apply(
      ...     variables, x, use_running_average=False, mutable=["batch_stats"])
      >>> # every ghost batch of 4 examples is normalized on its own
      >>> bool(jnp.allclose(y.reshape(4, 4, 3).mean(axis=1), 0.0, atol=1e-5))
      True
      >>> # running mean: one EMA step per ghost batch, in order (Algorithm 1)
      >>> means = x.reshape(4, 4, 3).mean(axis=1)
      >>> expected = sum(0.1 * 0.9 ** (3 - j) * means[j] for j in range(4))
      >>> bool(jnp.allclose(updates["batch_stats"]["mean"], expected, atol=1e-6))
      True
      >>> y_eval = gbn.apply({**variables, **updates}, x[:5], use_running_average=True)

    Attributes:
      use_running_average: normalize with the running statistics (inference); may
        also be given per call.
      axis: the feature axis (or axes) of the input.
      momentum: EMA decay of the running statistics, Flax convention.
      epsilon: added to the variance to avoid dividing by zero.
      dtype: the dtype of the result (default: infer from input and params).
      param_dtype: the dtype of scale and bias.
      use_bias: add a learned bias (beta).
      use_scale: multiply by a learned scale (gamma).
      bias_init: initializer for the bias.
      scale_init: initializer for the scale.
      axis_name: named axis (shard_map) holding consecutive slices of the global batch.
      axis_index_groups: device subgroups for axis_name (only with one ghost batch).
      use_fast_variance: one-pass variance E[x^2] - E[x]^2.
      force_float32_reductions: statistics in at least float32.
      ghost_batch_size: examples per ghost batch; None (or >= the batch) is ordinary
        batch norm; otherwise the training batch must be a multiple of it.
      running_update: "sequential" (Algorithm 1, default) or "mean".

    References:
      Hoffer et al. 2017, Section 4, Algorithm 1 (Ghost Batch Normalization).
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = jax.nn.initializers.zeros
    scale_init: Initializer = jax.nn.initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    ghost_batch_size: int | None = None
    running_update: str = "sequential"

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` per ghost batch (training) or with running statistics.

        Args:
          x: input, batch on the leading axis.
          use_running_average: overrides the field of the same name.
          mask: boolean, broadcastable to x; False entries are left out of statistics.

        Returns:
          The normalized input, same shape as x.
        """
        return linen_call(
            self,
            x,
            use_running_average,
            mask=mask,
            ghost_batch_size=self.ghost_batch_size,
            running_update=self.running_update,
        )


def linen_call(
    module: nn.Module,
    x: Array,
    use_running_average: bool | None = None,
    *,
    mask: Array | None = None,
    ghost_batch_size: int | None,
    running_update: str,
) -> Array:
    """The body of ``GhostBatchNorm.__call__`` for any linen module with BatchNorm's fields.

    Creates (or reads) the module's ``params/{scale,bias}`` and ``batch_stats/{mean,var}``
    exactly as ``nn.BatchNorm`` does, normalizes per ghost batch and updates the running
    statistics (not while initializing). :mod:`gbn_jax.ghostify` runs it in place of
    ``nn.BatchNorm.__call__``, inside the intercepted module.

    Args:
      module: a bound ``GhostBatchNorm`` or ``nn.BatchNorm``, inside its compact call.
      x: input, batch on the leading axis.
      use_running_average: merged with the module's field (``nn.merge_param``).
      mask: boolean, broadcastable to x; False entries are left out of statistics.
      ghost_batch_size: examples per ghost batch (None: the whole batch).
      running_update: "sequential" or "mean".

    Returns:
      The normalized input, same shape as x.
    """
    use_running_average = nn.merge_param(
        "use_running_average", module.use_running_average, use_running_average
    )
    feature_axes = _canonicalize_axes(jnp.ndim(x), module.axis)
    feature_shape = tuple(jnp.shape(x)[a] for a in feature_axes)
    stat_dtype = jnp.float32 if module.force_float32_reductions else module.param_dtype
    ra_mean = module.variable(
        "batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), feature_shape
    )
    ra_var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), feature_shape)
    scale = (
        module.param("scale", module.scale_init, feature_shape, module.param_dtype)
        if module.use_scale
        else None
    )
    bias = (
        module.param("bias", module.bias_init, feature_shape, module.param_dtype)
        if module.use_bias
        else None
    )
    initializing = module.is_initializing()
    y, new_mean, new_var = ghost_batch_norm(
        x,
        scale,
        bias,
        ra_mean.value,
        ra_var.value,
        use_running_average=use_running_average,
        ghost_batch_size=ghost_batch_size,
        running_update=running_update,
        axis=module.axis,
        momentum=module.momentum,
        epsilon=module.epsilon,
        dtype=module.dtype,
        axis_name=None if initializing else module.axis_name,
        axis_index_groups=None if initializing else module.axis_index_groups,
        use_fast_variance=module.use_fast_variance,
        force_float32_reductions=module.force_float32_reductions,
        mask=mask,
    )
    if not use_running_average and not initializing:
        ra_mean.value = new_mean
        ra_var.value = new_var
    return y
