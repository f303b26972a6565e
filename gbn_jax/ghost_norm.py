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

A batch that is not a multiple of the ghost size is an error by default;
``remainder="own_ghost_batch"`` makes its last ``batch % ghost_batch_size`` examples a
smaller ghost batch of their own (see :class:`GhostOptions`).

References:
  Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017, Section 4
  ("Ghost Batch Normalization"), Algorithm 1.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes
from flax.typing import Array, Dtype, Initializer
from jax import lax
from jax.sharding import PartitionSpec as P

RunningUpdate = Literal["sequential", "mean"]
Remainder = Literal["error", "own_ghost_batch"]
Layout = Literal["input", "ghost_batches"]
RUNNING_UPDATES: tuple[str, ...] = get_args(RunningUpdate)
REMAINDERS: tuple[str, ...] = get_args(Remainder)
LAYOUTS: tuple[str, ...] = get_args(Layout)
# A remainder of fewer examples than this joins the ghost batch before it: one example
# alone has variance 0 and would normalize to the bias.
MIN_REMAINDER = 2

# What each field of the layer means: the one description used by the docstrings of the
# linen and NNX modules and of GhostOptions. Fields named as in flax's BatchNorm mean
# what they mean there; the notes say what ghost batches add.
FIELD_DOCS = {
    "use_running_average": "normalize with the running statistics (inference); may "
    "also be given per call.",
    "axis": "the feature axis (or axes) of the input.",
    "momentum": "EMA decay m of the running statistics, Flax convention "
    "(new = m * old + (1 - m) * stat), in [0, 1]; 1 keeps them fixed.",
    "epsilon": "added to the variance to avoid dividing by zero.",
    "dtype": "the dtype of the result (default: inferred from input and params).",
    "param_dtype": "the dtype of scale and bias.",
    "use_bias": "add a learned bias (beta).",
    "use_scale": "multiply by a learned scale (gamma).",
    "bias_init": "initializer for the bias.",
    "scale_init": "initializer for the scale.",
    "axis_name": "named axis (shard_map) whose devices hold consecutive slices of one "
    "global batch; ghost batches are taken along that global batch.",
    "axis_index_groups": "device subgroups for axis_name (only with one ghost batch).",
    "use_fast_variance": "one-pass variance E[x^2] - E[x]^2.",
    "force_float32_reductions": "statistics in at least float32.",
    "ghost_batch_size": "examples per ghost batch, |B_S| in the paper; None, or a size "
    ">= the batch, is ordinary batch norm over the whole batch.",
    "running_update": '"sequential" (Algorithm 1: one EMA step per ghost batch, in '
    'order) or "mean" (one EMA step with the averaged ghost statistics).',
    "remainder": "what a training batch that is not a multiple of ghost_batch_size "
    'does: "error" (the default) raises; "own_ghost_batch" normalizes its last examples '
    "(the remainder) as one more, smaller ghost batch, which the running update counts "
    f"like any other; a remainder of fewer than {MIN_REMAINDER} examples joins the ghost "
    "batch before it instead. Not with axis_name or a batch sharded over an explicit "
    "mesh.",
    "layout": 'where the elementwise passes of training run: "input" (the default) on '
    "the input as it comes, each example with its ghost batch's statistics; "
    '"ghost_batches" on the input viewed as (ghost batches, ghost size, ...). The '
    "statistics are sums over that view in both. The results agree up to float "
    "rounding; XLA compiles the first to faster code, and the second is the rounding "
    "gbn_jax.models.F1 was trained with. A batch with a remainder is always laid out "
    "as ghost batches.",
}


def field_docs(names: Iterable[str], indent: int = 6) -> str:
    """Google-style ``name: description`` lines for the given fields of FIELD_DOCS."""
    lines = []
    for name in names:
        words, line = FIELD_DOCS[name].split(), " " * indent + f"{name}:"
        for word in words:
            if len(line) + 1 + len(word) > 88:
                lines.append(line)
                line = " " * (indent + 2) + word
            else:
                line += " " + word
        lines.append(line)
    return "\n".join(lines)


def check_momentum(momentum: float) -> None:
    """Raises ValueError unless ``momentum`` lies in [0, 1] (Flax's convention)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"{momentum=} must lie in [0, 1]: the running statistics update as "
            "m * old + (1 - m) * stat (0.9 is PyTorch's momentum 0.1)."
        )


@dataclasses.dataclass(frozen=True)
class GhostOptions:
    """The fields Ghost Batch Normalization adds to BatchNorm's, checked on creation.

    The linen and NNX modules, :mod:`gbn_jax.ghostify` and :func:`ghost_batch_norm`
    take these fields with these defaults and check them by creating one.

    Attributes:
      {fields}

    Raises:
      ValueError: for a value outside the rules above, naming the value and the fix.
    """

    ghost_batch_size: int | None = None
    running_update: RunningUpdate = "sequential"
    remainder: Remainder = "error"
    layout: Layout = "input"

    def __post_init__(self) -> None:
        ghost_batch_size = self.ghost_batch_size
        if ghost_batch_size is not None and (
            isinstance(ghost_batch_size, bool)
            or not isinstance(ghost_batch_size, numbers.Integral)
            or ghost_batch_size < 1
        ):
            raise ValueError(
                f"{ghost_batch_size=} must be None or a positive integer; pass e.g. "
                "ghost_batch_size=128, or None for ordinary batch norm."
            )
        if self.running_update not in RUNNING_UPDATES:
            running_update = self.running_update
            raise ValueError(
                f"Unknown {running_update=}; use one of "
                f"{RUNNING_UPDATES} ('sequential' is Algorithm 1 of the paper, 'mean' "
                "averages the ghost statistics)."
            )
        if self.remainder not in REMAINDERS:
            remainder = self.remainder
            raise ValueError(
                f"Unknown {remainder=}; use one of {REMAINDERS} ('error' "
                "rejects a batch that is not a multiple of ghost_batch_size, "
                "'own_ghost_batch' normalizes its last examples as a smaller ghost batch)."
            )
        if self.layout not in LAYOUTS:
            layout = self.layout
            raise ValueError(
                f"Unknown {layout=}; use one of {LAYOUTS} ('input' is the default, "
                "'ghost_batches' reproduces the rounding of the split layout)."
            )


GhostOptions.__doc__ = GhostOptions.__doc__.replace(
    "      {fields}", field_docs(dataclasses.asdict(GhostOptions()))
)


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


def nearest_divisor(n: int, size: int) -> int:
    """The divisor of `n` closest to `size` (the smaller of two equally close): the size
    to suggest when `size` does not divide `n`."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - size))


def _num_groups(batch: int, ghost_batch_size: int | None, where: str) -> int:
    """Number of contiguous ghost batches in a batch of ``batch`` examples."""
    if ghost_batch_size is None or ghost_batch_size >= batch:
        return 1
    if batch % ghost_batch_size:
        own = "" if where == "batch size" else " (not available with axis_name)"
        raise ValueError(
            f"The {where} ({batch}) is not a multiple of ghost_batch_size "
            f"({ghost_batch_size}). Pad the batch to a multiple of {ghost_batch_size} "
            f"(e.g. {-(-batch // ghost_batch_size) * ghost_batch_size} examples) and pass "
            "`mask` marking the padding False, choose a ghost_batch_size that divides "
            f"{batch} (e.g. {nearest_divisor(batch, ghost_batch_size)}), or set "
            f"remainder='own_ghost_batch'{own} to normalize the last "
            f"{batch % ghost_batch_size} examples as a smaller ghost batch."
        )
    return batch // ghost_batch_size


def _pack_with_remainder(v: Array, ghost_batch_size: int, fill: Any) -> Array:
    """Lays a batch with a remainder out as ghost batches of equal length (axis 0, 1).

    The last ``batch % ghost_batch_size`` examples are a ghost batch of their own, or,
    when fewer than MIN_REMAINDER, the end of the ghost batch before them. Shorter ghost
    batches are padded with ``fill`` at their end (mask the padding out).
    """
    full, rest = divmod(v.shape[0], ghost_batch_size)
    rows = [(0, 0)] * (v.ndim - 1)
    if rest >= MIN_REMAINDER:
        padded = jnp.pad(v, [(0, ghost_batch_size - rest), *rows], constant_values=fill)
        return padded.reshape(full + 1, ghost_batch_size, *v.shape[1:])
    head = v[: (full - 1) * ghost_batch_size].reshape(full - 1, ghost_batch_size, *v.shape[1:])
    head = jnp.pad(head, [(0, 0), (0, rest), *rows], constant_values=fill)
    last = v[(full - 1) * ghost_batch_size :][None]
    return jnp.concatenate([head, last])


def _unpack_with_remainder(y: Array, batch: int, ghost_batch_size: int) -> Array:
    """The inverse of :func:`_pack_with_remainder`: the batch without the padding."""
    if batch % ghost_batch_size >= MIN_REMAINDER:
        return y.reshape(-1, *y.shape[2:])[:batch]
    head = y[:-1, :ghost_batch_size].reshape(-1, *y.shape[2:])
    return jnp.concatenate([head, y[-1]])


def _checked_mask(mask: Array | None, x_shape: tuple[int, ...]) -> Array | None:
    """``mask`` as a boolean array of the input's rank, after checking it broadcasts."""
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
    return mask.reshape((1,) * (len(x_shape) - mask.ndim) + mask.shape)


def _grouped_mask(mask: Array | None, x_shape: tuple[int, ...], groups: int) -> Array | None:
    """Reshapes ``mask`` (broadcastable to x) to broadcast against the grouped input."""
    mask = _checked_mask(mask, x_shape)
    if mask is None:
        return None
    if mask.shape[0] == 1:
        return mask[None]
    return mask.reshape((groups, x_shape[0] // groups, *mask.shape[1:]))


def _packed_mask(mask: Array | None, x_shape: tuple[int, ...], ghost_batch_size: int) -> Array:
    """The mask of :func:`_pack_with_remainder`'s layout: padding and masked entries False."""
    rows = np.ones((x_shape[0],) + (1,) * (len(x_shape) - 1), bool)
    packed = _pack_with_remainder(jnp.asarray(rows), ghost_batch_size, False)
    mask = _checked_mask(mask, x_shape)
    if mask is None:
        return packed
    if mask.shape[0] == 1:
        return packed & mask[None]
    return packed & _pack_with_remainder(mask, ghost_batch_size, False)


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
    seen = nonempty.astype(dtype)
    total = seen.sum(0)
    after = total - jnp.cumsum(seen, axis=0)
    return momentum**total, seen * (1.0 - momentum) * momentum**after


def _update_running(
    old: Array,
    stats: Array,
    nonempty: Array | None,
    momentum: float,
    running_update: RunningUpdate,
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
        seen = nonempty.astype(real)
        total = seen.sum(0)
        avg = jnp.sum(seen * stats, axis=0) / jnp.maximum(total, 1.0)
        new = jnp.where(total > 0, momentum * flat_old + (1.0 - momentum) * avg, flat_old)
    return new.reshape(old.shape).astype(jnp.result_type(old.dtype, stats.dtype))


def _cross_device(
    sums: tuple[Array, ...],
    axis_name: str | None,
    devices_per_ghost_batch: int,
    axis_index_groups: Any,
) -> tuple[Array, ...]:
    """Adds up per-device sums (ghost batches on axis 0) over the devices sharing one.

    ``devices_per_ghost_batch`` consecutive devices hold each ghost batch: 1 when every
    ghost batch is local (nothing to do), the number of devices when one ghost batch
    covers them all (ordinary distributed batch norm).
    """
    if axis_name is None or devices_per_ghost_batch == 1:
        return sums
    if len({v.dtype for v in sums}) > 1:  # complex sums next to real ones
        return tuple(
            out
            for v in sums
            for out in _cross_device((v,), axis_name, devices_per_ghost_batch, axis_index_groups)
        )
    stacked = jnp.stack(sums)  # one collective for all statistics
    if devices_per_ghost_batch == lax.axis_size(axis_name):
        return tuple(lax.psum(stacked, axis_name, axis_index_groups=axis_index_groups))
    gathered = lax.all_gather(stacked, axis_name, axis=1, tiled=True)
    per_ghost_batch = gathered.reshape(
        gathered.shape[0], -1, devices_per_ghost_batch, *gathered.shape[2:]
    ).sum(2)
    own_ghost_batch = lax.axis_index(axis_name) // devices_per_ghost_batch
    own = lax.dynamic_slice_in_dim(per_ghost_batch, own_ghost_batch, 1, axis=1)
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


def _sum_consecutive(sums: tuple[Array, ...], shards_per_ghost_batch: int) -> tuple[Array, ...]:
    """Sums of ``shards_per_ghost_batch`` consecutive pieces (axis 0), repeated for each.

    For a ghost batch spread over several shards of an explicit mesh: the small
    per-shard sums are gathered (replicated), added up per ghost batch and broadcast back,
    sharded as they came, so that each shard's examples meet their statistics locally.
    """
    out = []
    for v in sums:
        full = jax.sharding.reshard(v, P())
        total = full.reshape(-1, shards_per_ghost_batch, *full.shape[1:]).sum(1, keepdims=True)
        shape = (total.shape[0], shards_per_ghost_batch, *full.shape[1:])
        each = jnp.broadcast_to(total, shape).reshape(v.shape)
        out.append(jax.sharding.reshard(each, jax.typeof(v).sharding.spec))
    return tuple(out)


def _global_ghost_batches(stats: Array, axis_name: str, devices_per_ghost_batch: int) -> Array:
    """Per-ghost-batch statistics (axis 1) of the whole global batch, in device order.

    Each device writes its own ghost batches into a zero buffer at their global position
    and one psum assembles the result (which is then the same on every device).
    """
    device = lax.axis_index(axis_name)
    local = stats.shape[1]
    if devices_per_ghost_batch == 1:
        rows, start = lax.axis_size(axis_name) * local, device * local
    else:  # several devices share each ghost batch: the first of them writes it
        rows = lax.axis_size(axis_name) // devices_per_ghost_batch
        start = device // devices_per_ghost_batch
        stats = jnp.where(device % devices_per_ghost_batch == 0, stats, 0)
    buffer = jnp.zeros((stats.shape[0], rows, *stats.shape[2:]), stats.dtype)
    return lax.psum(lax.dynamic_update_slice_in_dim(buffer, stats, start, axis=1), axis_name)


def _varying_like(param: Array, x: Array) -> Array:
    """Marks a replicated parameter as varying over the manual mesh axes x varies over.

    Inside shard_map, autodiff then sums its per-device gradients (the transpose of
    the cast), as it does for nn.BatchNorm, although our derivative is a custom rule.
    """
    missing = tuple(sorted(_varying_axes(x) - _varying_axes(param)))
    return lax.pcast(param, missing, to="varying") if missing else param


def _varying_axes(v: Array) -> frozenset:
    aval = jax.typeof(v)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older: `.vma`
    return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def _group_normalizer(
    reduce_axes: tuple[int, ...],
    epsilon: float,
    use_fast_variance: bool,
    stat_dtype: Dtype,
    out_dtype: Dtype,
    combine: Callable[..., tuple[Array, ...]],
    groups: int | None = None,
) -> Callable[..., tuple[Array, Array, Array, Array]]:
    """Builds ``normalize(xg, scale, bias, mask) -> (y, mean, var, count)`` per group.

    ``xg`` has the ghost batches on axis 0, or is one ghost batch; ``reduce_axes`` are the
    axes reduced for statistics; ``scale``, ``bias`` broadcast against ``xg`` (or are
    None); ``mask`` is None or a boolean array broadcastable to ``xg``; ``combine`` adds up
    sums of a ghost batch that is spread over several devices.

    With ``groups``, ``xg`` is instead the input as it comes (``mask`` broadcastable to
    it): the sums see it split into ``groups`` ghost batches on a new axis 0 (a view; the
    axes above, the statistics and ``scale``, ``bias`` are in that grouped layout), and
    the elementwise passes run on the input's own layout, each example with its ghost
    batch's statistics.

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

    def grouped_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape if groups is None else (groups, shape[0] // groups, *shape[1:])

    def group_sum(v: Array, mask: Array | None = None) -> Array:
        v = masked(v, mask)
        return v.reshape(grouped_shape(v.shape)).sum(reduce_axes, keepdims=True)

    def per_example(s: Array, batch: int) -> Array:
        """Per-group values (grouped layout) broadcast against the ``batch`` examples."""
        if groups is None:
            return s
        if s.shape[0] == 1:
            return s.reshape(s.shape[1:])
        rows = jnp.broadcast_to(s, (groups, batch // groups, *s.shape[2:]))
        return rows.reshape(batch, *s.shape[2:])

    def forward(xg, scale, bias, mask):
        """Outputs and the values the tangent rule needs."""
        batch = xg.shape[0]
        xf = xg.astype(stat_dtype)
        s1 = group_sum(xf, mask)
        shape = grouped_shape(xg.shape)
        if mask is None:
            local_count = float(np.prod([shape[a] for a in reduce_axes]))
            count = jnp.full(s1.shape, local_count, real_dtype)
        else:
            if groups is not None:  # one mask row per example, so that it can be split
                mask = jnp.broadcast_to(mask, (batch, *mask.shape[1:]))
            mask_shape = grouped_shape(mask.shape)
            missing = np.prod([shape[a] for a in reduce_axes if mask_shape[a] == 1])
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
            (s2,) = combine(group_sum(_abs_sq(xf - per_example(mean, batch)), mask))
            var = s2 / n
        inv_std = lax.rsqrt(var + epsilon)
        mul = inv_std if scale is None else inv_std * scale
        centred = xf - per_example(mean, batch)
        y = centred * per_example(mul, batch)
        if bias is not None:
            y = y + per_example(bias, batch)
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
        batch = xg.shape[0]
        dy = per_example(mul, batch) * dxf
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
        dy = dy + centred * per_example(per_centred, batch) + per_example(per_group, batch)
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
    ghost_batch_size: int | None = GhostOptions.ghost_batch_size,
    running_update: RunningUpdate = GhostOptions.running_update,
    remainder: Remainder = GhostOptions.remainder,
    layout: Layout = GhostOptions.layout,
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
      {fields}
      mask: boolean array broadcastable to x; False entries are left out of their
        ghost batch's statistics. A ghost batch with nothing unmasked is skipped by the
        running update.

    Returns:
      ``(y, new_running_mean, new_running_var)``; with ``use_running_average`` the
      running statistics come back unchanged.

    Raises:
      ValueError: for a batch that is not a multiple of ``ghost_batch_size`` (with
        ``remainder="error"``), an invalid field (see :class:`GhostOptions`) or an
        invalid mask, axis or momentum.

    References:
      Hoffer et al. 2017, Section 4, Algorithm 1 (Ghost Batch Normalization).
    """
    GhostOptions(ghost_batch_size, running_update, remainder, layout)
    check_momentum(momentum)
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
        mean, var = running_mean, running_var
        if not force_float32_reductions and scale is not None:
            mean, var = mean.astype(scale.dtype), var.astype(scale.dtype)
        y = affine(x, as_features(mean, ndim), as_features(var, ndim))
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
    # With a remainder (remainder="own_ghost_batch") the ghost batches differ in size:
    # they are padded to one length and the padding is masked out.
    with_remainder = (
        remainder == "own_ghost_batch"
        and axis_name is None
        and ghost_batch_size is not None
        and ghost_batch_size < batch
        and batch % ghost_batch_size != 0
    )
    if axis_name is None:
        devices_per_ghost_batch = 1
        if with_remainder:  # the full ghost batches, and the remainder on its own
            full, rest = divmod(batch, ghost_batch_size)
            groups = full + 1 if rest >= MIN_REMAINDER else full
            with_remainder = groups > 1  # else the whole batch is one ghost batch
        else:
            groups = _num_groups(batch, ghost_batch_size, "batch size")
    elif ghost_batch_size is None or ghost_batch_size >= batch * devices:
        groups, devices_per_ghost_batch = 1, devices
    elif ghost_batch_size <= batch:
        groups = _num_groups(batch, ghost_batch_size, "per-device batch size")
        devices_per_ghost_batch = 1
    else:
        _num_groups(batch * devices, ghost_batch_size, "global batch size")
        if ghost_batch_size % batch:
            raise ValueError(
                f"ghost_batch_size ({ghost_batch_size}) spans several devices but is not a "
                f"multiple of the per-device batch size ({batch}); use a ghost size that "
                "is a multiple or a divisor of the per-device batch."
            )
        groups, devices_per_ghost_batch = 1, ghost_batch_size // batch
    combine = lambda *sums: _cross_device(
        sums, axis_name, devices_per_ghost_batch, axis_index_groups
    )

    # Under an explicit mesh a reshape must keep the batch sharding expressible: a
    # ghost batch spread over several shards is cut into one piece per shard, and the
    # pieces' (small) sums are added up across shards.
    pieces, shards_per_ghost_batch = groups, 1
    shards, mesh_axes = _explicit_batch_shards(x) if axis_name is None else (1, ())
    if with_remainder and shards > 1:
        raise ValueError(
            f"The batch ({batch}) is sharded over {shards} devices (explicit mesh axes "
            f"{mesh_axes}), and {remainder=} would need ghost batches of unequal size "
            f"across them; pad the batch to a multiple of {ghost_batch_size} and pass "
            "`mask` marking the padding False."
        )
    if groups > 1 and groups % shards and shards % groups:
        raise ValueError(
            f"The batch ({batch}) is sharded over {shards} devices (explicit mesh axes "
            f"{mesh_axes}), {batch // shards} examples each, and ghost batches of "
            f"{ghost_batch_size} would straddle devices; use a ghost_batch_size that "
            f"divides {batch // shards} or is a multiple of it."
        )
    if 1 < groups < shards:
        pieces, shards_per_ghost_batch = shards, shards // groups
        combine = lambda *sums: _sum_consecutive(sums, shards_per_ghost_batch)

    # One ghost batch on this device is normalized as it comes: with a leading axis of
    # size 1, XLA:CPU compiles the backward pass's sum of dy * (x - mean) to a reduction
    # that is tens of times slower than the same sum over the unsplit input.
    one_piece = pieces == 1 and not with_remainder
    # layout="input": the input is split into ghost batches for the sums only, and the
    # elementwise passes keep its own layout. Written on the split layout, they made
    # XLA:CPU schedule a conv net's backward pass so that no weight gradient of a
    # convolution overlapped anything else (bench_conv_step_profile in
    # experiments/results), and a dense net's step slower than nn.BatchNorm's.
    split_for_sums = not one_piece and not with_remainder and layout == "input"
    if with_remainder:
        grouped = _pack_with_remainder(x, ghost_batch_size, 0)
        grouped_mask = _packed_mask(mask, x.shape, ghost_batch_size)
    elif one_piece or split_for_sums:
        grouped, grouped_mask = x, _checked_mask(mask, x.shape)
    else:
        grouped = x.reshape(pieces, batch // pieces, *x.shape[1:])
        grouped_mask = _grouped_mask(mask, x.shape, pieces)
    # Statistics reduce the examples of a ghost batch (axis 1 of the split layout, or axis
    # 0 of one ghost batch, unless that axis holds features) and every other non-feature axis.
    lead = 0 if one_piece else 1
    reduce_axes = tuple(a + lead for a in range(ndim) if a not in feature_axes)
    normalize = _group_normalizer(
        reduce_axes,
        epsilon,
        use_fast_variance,
        stat_dtype,
        out_dtype,
        combine,
        groups=pieces if split_for_sums else None,
    )
    y, mean, var, count = normalize(
        grouped,
        None if scale is None else _varying_like(as_features(scale, ndim + lead), x),
        None if bias is None else _varying_like(as_features(bias, ndim + lead), x),
        grouped_mask,
    )
    if one_piece:  # the statistics in the grouped layout: one ghost batch on axis 0
        mean, var, count = mean[None], var[None], count[None]
    y = _unpack_with_remainder(y, batch, ghost_batch_size) if with_remainder else y.reshape(x.shape)
    if shards_per_ghost_batch > 1:  # one copy of each ghost batch's statistics
        step = shards_per_ghost_batch
        mean, var, count = (jax.sharding.reshard(v, P())[::step] for v in (mean, var, count))

    # The running update follows the global order of ghost batches, so under a named
    # axis it needs every device's ghost-batch statistics (small arrays, one psum).
    if axis_name is not None and devices_per_ghost_batch < devices:
        mean, var, count = _global_ghost_batches(
            jnp.stack([mean, var, count]), axis_name, devices_per_ghost_batch
        )
    k = mean.shape[0]
    nonempty = None if mask is None else (count > 0).reshape(k, -1)
    new_mean = _update_running(
        running_mean, mean.reshape(k, -1), nonempty, momentum, running_update
    )
    new_var = _update_running(running_var, var.reshape(k, -1), nonempty, momentum, running_update)
    return y, new_mean, new_var


_FUNCTION_FIELDS = (
    "ghost_batch_size",
    "running_update",
    "remainder",
    "layout",
    "axis",
    "momentum",
    "epsilon",
    "dtype",
    "axis_name",
    "axis_index_groups",
    "use_fast_variance",
    "force_float32_reductions",
)
ghost_batch_norm.__doc__ = ghost_batch_norm.__doc__.replace(
    "      {fields}", field_docs(_FUNCTION_FIELDS)
)


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
      {fields}

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
    ghost_batch_size: int | None = GhostOptions.ghost_batch_size
    running_update: RunningUpdate = GhostOptions.running_update
    remainder: Remainder = GhostOptions.remainder
    layout: Layout = GhostOptions.layout

    def __post_init__(self) -> None:
        _ = self.ghost_options  # checks the fields when the module is created
        check_momentum(self.momentum)
        super().__post_init__()

    @property
    def ghost_options(self) -> GhostOptions:
        """The ghost fields as one checked :class:`GhostOptions`."""
        return GhostOptions(self.ghost_batch_size, self.running_update, self.remainder, self.layout)

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
        return linen_call(self, x, use_running_average, mask=mask, options=self.ghost_options)


GhostBatchNorm.__doc__ = GhostBatchNorm.__doc__.replace(
    "      {fields}",
    field_docs(f.name for f in dataclasses.fields(GhostBatchNorm) if f.name in FIELD_DOCS),
)


def linen_call(
    module: nn.Module,
    x: Array,
    use_running_average: bool | None = None,
    *,
    mask: Array | None = None,
    options: GhostOptions,
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
      options: ghost batch size, running update, remainder rule and layout.

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
        ghost_batch_size=options.ghost_batch_size,
        running_update=options.running_update,
        remainder=options.remainder,
        layout=options.layout,
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
