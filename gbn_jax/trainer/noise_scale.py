"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018).

G is the true (full-data) gradient and Sigma the covariance of per-example gradients.
The mean gradient of a batch of B examples drawn independently satisfies

    E |G_B|^2 = |G|^2 + tr(Sigma) / B,

so squared gradient norms measured at two batch sizes B_small < B_big give unbiased
estimates of both terms (McCandlish et al., appendix A.1):

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

B_simple, the critical batch size under a simplified (isotropic) model of the loss,
is their ratio. The ratio of two unbiased estimates is biased, so average each
estimate over many steps (or batches) first and divide the averages, as McCandlish
et al. do with moving averages; `simple_noise_scale` does that for arrays.

Three ways to get the norms:

* `estimate_from_norms`: the formulas above, for norms measured anywhere.
* `subset_noise_scale`: after training, on a fixed subset cut into chunks: B_small is
  a chunk, B_big the whole subset, one gradient pass in all.
* `sharded_value_and_grad`: during training, inside the jitted step. Each device
  computes the gradient of its shard (optionally split into ``micro_batches``) under
  ``jax.shard_map``; the squared norms of those shard gradients are the small-batch
  norms, and their mean is the global gradient the optimizer needs anyway. The extra
  work is one squared norm per shard and a scalar all-reduce.

Which loss. The estimator assumes the batch gradient is the mean of independent
per-example gradients. That holds for a model without batch norm, for batch norm in
eval mode, and for ghost batch norm when every ghost batch lies inside one shard; with
plain batch norm in train mode the examples of a batch interact through its
statistics, and a shard's gradient is then that of a batch normalized over the shard.

References:
  McCandlish, Kaplan, Amodei & OpenAI Dota Team, "An empirical model of large-batch
  training", arXiv:1812.06162 (2018): section 2.2 (B_simple) and appendix A.1
  (the unbiased estimates from two batch sizes, measured across devices).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

__all__ = [
    "NoiseScaleEstimate",
    "SubsetNoiseScale",
    "combine_running_stats",
    "estimate_from_norms",
    "sharded_value_and_grad",
    "simple_noise_scale",
    "squared_norm",
    "subset_noise_scale",
]

RUNNING_STAT_RULES = ("sequential", "mean")


class NoiseScaleEstimate(NamedTuple):
    """Unbiased estimates from one pair of batch sizes (a pytree, usable under jit).

    Attributes:
      grad_sq: estimate of |G|^2, the squared norm of the true gradient. Can come out
        negative when the noise dominates; average over steps before dividing.
      trace_sigma: estimate of tr(Sigma), the summed variance of per-example gradients.
      sq_norm_small: the measured |G_small|^2 the estimates come from (None if not given).
      sq_norm_big: the measured |G_big|^2 (None if not given).
    """

    grad_sq: Any
    trace_sigma: Any
    sq_norm_small: Any = None
    sq_norm_big: Any = None


@dataclasses.dataclass(frozen=True)
class SubsetNoiseScale:
    """The noise scale measured on a fixed subset (`subset_noise_scale`).

    Attributes:
      b_simple: tr(Sigma) / |G|^2 from the two estimates below.
      grad_sq: estimate of |G|^2.
      trace_sigma: estimate of tr(Sigma).
      batch_small: B_small, the examples of one chunk.
      batch_big: B_big, the examples of the whole subset.
      sq_norm_small: mean over chunks of |G_small|^2.
      sq_norm_big: |G_big|^2, the squared norm of the subset's gradient.
      loss: the loss on the subset.
      wall_time_sec: seconds for the whole call, compilation included.
    """

    b_simple: float
    grad_sq: float
    trace_sigma: float
    batch_small: int
    batch_big: int
    sq_norm_small: float
    sq_norm_big: float
    loss: float
    wall_time_sec: float


def squared_norm(tree: Any) -> jax.Array:
    """Sum of squares of every leaf, accumulated in float32 (or wider)."""
    leaves = [
        jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))))
        for x in jax.tree.leaves(tree)
    ]
    return sum(leaves, jnp.zeros((), jnp.float32))


def estimate_from_norms(
    sq_norm_small: Any, sq_norm_big: Any, batch_small: int, batch_big: int
) -> NoiseScaleEstimate:
    """Unbiased |G|^2 and tr(Sigma) from squared gradient norms at two batch sizes.

    Args:
      sq_norm_small: |G_small|^2, the squared norm of a mean gradient over B_small
        examples (or the mean of several such norms: the estimate stays unbiased and
        its variance drops).
      sq_norm_big: |G_big|^2 at B_big examples (or a mean of such norms).
      batch_small: B_small > 0.
      batch_big: B_big > B_small.

    Returns:
      A `NoiseScaleEstimate` of the same array type as the norms, the two norms kept
      in it.

    Raises:
      ValueError: unless 0 < batch_small < batch_big.

    References:
      McCandlish et al. (2018), appendix A.1, equations (A.2)-(A.3).

    >>> est = estimate_from_norms(1.0 + 8.0 / 2, 1.0 + 8.0 / 8, 2, 8)
    >>> float(est.grad_sq), float(est.trace_sigma)
    (1.0, 8.0)
    """
    for name, value in (("batch_small", batch_small), ("batch_big", batch_big)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer (examples).")
    if not batch_small < batch_big:
        raise ValueError(
            f"batch_small={batch_small} must be smaller than batch_big={batch_big}; the "
            "estimate needs two different batch sizes."
        )
    b_small, b_big = float(batch_small), float(batch_big)
    grad_sq = (b_big * sq_norm_big - b_small * sq_norm_small) / (b_big - b_small)
    trace_sigma = (sq_norm_small - sq_norm_big) / (1.0 / b_small - 1.0 / b_big)
    return NoiseScaleEstimate(grad_sq, trace_sigma, sq_norm_small, sq_norm_big)


def simple_noise_scale(trace_sigma: Any, grad_sq: Any) -> float:
    """B_simple = mean(tr(Sigma) estimates) / mean(|G|^2 estimates).

    Args:
      trace_sigma: one estimate or an array of them (e.g. one per logged step).
      grad_sq: the matching |G|^2 estimate(s), same shape.

    Returns:
      The ratio of the means, a float; inf or negative when the averaged |G|^2
      estimate is not positive (the noise still dominates: average over more steps).

    Raises:
      ValueError: for shapes that differ or an empty input.

    References:
      McCandlish et al. (2018), appendix A.1 (average numerator and denominator
      separately: the ratio of unbiased estimates is biased).
    """
    s = np.asarray(trace_sigma, np.float64)
    g = np.asarray(grad_sq, np.float64)
    if s.shape != g.shape:
        raise ValueError(
            f"trace_sigma has shape {s.shape} but grad_sq has shape {g.shape}; pass the "
            "two estimates of the same steps."
        )
    if s.size == 0:
        raise ValueError("No estimates given; pass at least one (trace_sigma, grad_sq) pair.")
    mean_s, mean_g = float(s.mean()), float(g.mean())
    if mean_g == 0.0:
        return math.copysign(math.inf, mean_s)
    return mean_s / mean_g


def subset_noise_scale(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Any,
    *,
    compiler_options: dict[str, Any] | None = None,
) -> SubsetNoiseScale:
    """B_simple on a fixed subset: chunks are the small batches, the subset the big one.

    One jitted scan over the chunks computes every chunk's gradient g_c; the mean of
    |g_c|^2 is |G_small|^2 at B_small = chunk size, and |mean_c g_c|^2 is |G_big|^2
    at B_big = the subset. Memory holds one chunk and two gradients.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of one batch (e.g.
        ``sharpness.model_loss(...)``).
      params: where to measure (a pytree of float arrays).
      batches: at least two chunks, every leaf shaped (num_chunks, chunk, ...)
        (``sharpness.chunk_batches``). Draw the subset at random from the training
        set: the estimates are unbiased over that draw.
      compiler_options: passed to ``jax.jit``.

    Returns:
      A `SubsetNoiseScale`.

    Raises:
      ValueError: fewer than two chunks, or leaves of different shapes.
    """
    start = time.perf_counter()
    leaves = jax.tree.leaves(batches)
    shapes = {tuple(np.shape(x)[:2]) for x in leaves}
    if not leaves or len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"Every leaf of batches must be shaped (num_chunks, chunk, ...) alike; got "
            f"{sorted(shapes)}. Build them with sharpness.chunk_batches(subset, chunk_size)."
        )
    ((num_chunks, chunk),) = shapes
    if num_chunks < 2:
        raise ValueError(
            f"Got {num_chunks} chunk of {chunk} examples; the estimate needs two batch sizes, "
            "so pass at least two chunks (a smaller chunk_size or a larger subset)."
        )

    def measure(params, batches):
        def body(carry, batch):
            loss_sum, grad_sum, sq_sum = carry
            loss, grad = jax.value_and_grad(loss_fn)(params, batch)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grad)
            return (loss_sum + loss, grad_sum, sq_sum + squared_norm(grad)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (jnp.zeros((), jnp.float32), zeros, jnp.zeros((), jnp.float32))
        (loss_sum, grad_sum, sq_sum), _ = lax.scan(body, init, batches)
        mean_grad = jax.tree.map(lambda g: g / num_chunks, grad_sum)
        return loss_sum / num_chunks, sq_sum / num_chunks, squared_norm(mean_grad)

    run = jax.jit(measure, compiler_options=compiler_options or None)
    loss, sq_small, sq_big = (float(v) for v in run(params, batches))
    est = estimate_from_norms(sq_small, sq_big, chunk, chunk * num_chunks)
    return SubsetNoiseScale(
        b_simple=simple_noise_scale(est.trace_sigma, est.grad_sq),
        grad_sq=float(est.grad_sq),
        trace_sigma=float(est.trace_sigma),
        batch_small=int(chunk),
        batch_big=int(chunk * num_chunks),
        sq_norm_small=sq_small,
        sq_norm_big=sq_big,
        loss=loss,
        wall_time_sec=time.perf_counter() - start,
    )


def sharded_value_and_grad(
    loss_fn: Callable[..., Any],
    mesh: jax.sharding.Mesh,
    *,
    axis_name: str = "data",
    micro_batches: int = 1,
    has_aux: bool = False,
    unroll: bool | int = True,
    vectorize: bool = False,
) -> Callable[..., tuple[Any, Any, NoiseScaleEstimate]]:
    """``jax.value_and_grad`` for a data-parallel step that also estimates the noise scale.

    The batch is cut into S = devices x ``micro_batches`` contiguous shards (device
    d holds shards d * micro_batches, ..., in the order of the global batch). Under
    ``jax.shard_map`` over ``axis_name`` each device takes the gradient of each of
    its shards' mean loss (its micro-batches one after another, in an unrolled
    ``lax.scan`` that accumulates the gradient), then

      grads = mean over shards of g_s                    (one all-reduce, as usual)
      |G_small|^2 = mean over shards of |g_s|^2          (a scalar all-reduce)
      |G_big|^2 = |grads|^2

    with B_small = B / S and B_big = B. With one device, ``micro_batches >= 2`` still
    gives small batches, at the cost of running the model on smaller pieces.

    Use it where the step calls ``jax.value_and_grad``. Each shard runs the model on
    its own examples, so a model whose examples interact must keep that interaction
    inside a shard: ghost batch norm with ghost batches that divide B / S computes
    exactly the function of the unsharded step, but each shard updates the running
    statistics from its own ghost batches; `combine_running_stats` merges them into
    the update of the whole batch. A plain batch norm in train mode would normalize
    over each shard instead of the global batch.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``), the mean loss of the examples in ``batch``. With ``rng=``
        passed to the returned function it is called with ``rng=`` a key that
        differs between shards (``fold_in(rng, shard)``).
      mesh: the mesh the batch is sharded over.
      axis_name: the mesh axis of the batch ("data" in the trainer).
      micro_batches: shards per device, >= 1; S = devices x micro_batches >= 2.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      unroll: ``lax.scan``'s unroll of the micro-batch loop. True (all) lets XLA overlap
        the micro-batches in a train step; 1 (rolled) compiles one copy of the model, for
        a measurement taken
        now and then (`gbn_jax.trainer.steps.make_noise_scale_measurement`).
      vectorize: run the micro-batches side by side under ``jax.vmap`` instead (one
        gradient per micro-batch in memory): one pass of large kernels, where the loop
        would launch small ones micro-batch after micro-batch (accelerators).

    Returns:
      ``fn(params, batch, *args, rng=None) -> (value, grads, estimate)``, to call
      inside ``jax.jit``. ``params`` and ``args`` are replicated, every leaf of
      ``batch`` is split along its leading axis (whose size must be a multiple of S).
      ``value`` is the loss averaged over shards, or ``(loss, aux)`` where every aux
      leaf gains a leading axis of S (shard s's aux at index s, sharded over
      ``axis_name``); ``grads`` the mean gradient, replicated; ``estimate`` a
      `NoiseScaleEstimate` of float32 scalars.

    Raises:
      ValueError: an unknown axis, a bad ``micro_batches``, fewer than two shards, or
        (when called) a batch that does not split into S equal shards.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"{axis_name=} is not an axis of the mesh {tuple(mesh.axis_names)}; pass the "
            "axis the batch is sharded over."
        )
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"{micro_batches=} must be a positive integer (shards per device).")
    devices = mesh.shape[axis_name]
    shards = devices * micro_batches
    if shards < 2:
        raise ValueError(
            f"{devices} device(s) x micro_batches={micro_batches} give one shard; the noise "
            "scale needs two batch sizes, so set micro_batches=2 (or more)."
        )

    def per_device(params, batch, args, rng):
        first_shard = lax.axis_index(axis_name) * micro_batches
        # Replicated params would make autodiff sum the gradient over devices; cast to
        # varying, each device differentiates its own shards only.
        local = jax.tree.map(lambda p: lax.pcast(p, axis_name, to="varying"), params)
        split = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)

        def shard_grad(shard_batch, index):
            kwargs = {} if rng is None else {"rng": jax.random.fold_in(rng, first_shard + index)}
            value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(
                local, shard_batch, *args, **kwargs
            )
            loss, aux = value if has_aux else (value, None)
            return loss, aux, grads

        if vectorize:
            loss, aux, grads = jax.vmap(shard_grad)(split, jnp.arange(micro_batches))
            grad_sum = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
            sq_sum = jnp.sum(jax.vmap(squared_norm)(grads))
            loss_sum = jnp.sum(loss.astype(jnp.float32))
            return reduce(grad_sum, sq_sum, loss_sum, aux)

        def shard(carry, inputs):
            grad_sum, sq_sum, loss_sum = carry
            loss, aux, grads = shard_grad(*inputs)
            carry = (
                jax.tree.map(jnp.add, grad_sum, grads),
                sq_sum + squared_norm(grads),
                loss_sum + loss.astype(jnp.float32),
            )
            return carry, aux

        # The micro-batches one after another, not side by side under vmap (batched
        # matrix products are slower on the CPU), and unrolled by default so that XLA
        # can overlap the micro-batches' work.
        zero = lax.pcast(jnp.zeros((), jnp.float32), axis_name, to="varying")
        init = (jax.tree.map(jnp.zeros_like, local), zero, zero)
        (grad_sum, sq_sum, loss_sum), aux = lax.scan(
            shard, init, (split, jnp.arange(micro_batches)), unroll=unroll
        )
        return reduce(grad_sum, sq_sum, loss_sum, aux)

    def reduce(grad_sum, sq_sum, loss_sum, aux):
        """Sums over this device's micro-batches -> means over all shards."""
        sq_small = lax.psum(sq_sum, axis_name) / shards
        mean_grads = jax.tree.map(lambda g: lax.psum(g, axis_name) / shards, grad_sum)
        mean_loss = lax.psum(loss_sum, axis_name) / shards
        return mean_loss, aux, mean_grads, sq_small, squared_norm(mean_grads)

    def fn(params: Any, batch: Any, *args: Any, rng: jax.Array | None = None):
        sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
        if len(sizes) != 1 or next(iter(sizes)) % shards:
            raise ValueError(
                f"The batch's leading sizes {sorted(sizes)} must all be one multiple of the "
                f"{shards} shards ({devices} devices x micro_batches={micro_batches}); "
                "change the batch size or micro_batches."
            )
        (batch_size,) = sizes
        mapped = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(axis_name), P(), P()),
            out_specs=(P(), P(axis_name), P(), P(), P()),
            axis_names={axis_name},
        )
        loss, aux, grads, sq_small, sq_big = mapped(params, batch, args, rng)
        estimate = estimate_from_norms(sq_small, sq_big, batch_size // shards, batch_size)
        value = (loss, aux) if has_aux else loss
        return value, grads, estimate

    return fn


def combine_running_stats(
    shard_stats: Any,
    old_stats: Any,
    *,
    rule: str,
    momentum: float | None = None,
    updates_per_shard: int | None = None,
) -> Any:
    """Merges running statistics updated shard by shard into one update of the batch.

    Each shard s of `sharded_value_and_grad` starts from ``old`` and returns
    ``new_s``. For ghost batch norm ("sequential", Algorithm 1 of Hoffer et al.) a
    shard's update is new_s = a old + u_s with a = momentum ** (ghost batches per
    shard); applying the shards one after another in batch order gives the update of
    the whole batch exactly:

      new = a^S old + sum_s a^(S - 1 - s) u_s,   u_s = new_s - a old.

    For ghost batch norm with ``running_update="mean"`` the update of the whole batch
    is the mean of the shards' updates (``rule="mean"``). For a plain batch norm in
    train mode neither is exact: "mean" keeps the batch mean exact and averages the
    shards' variances (leaving out the variance between shard means).

    Args:
      shard_stats: the shards' updated statistics, every leaf with a leading axis S
        (the aux of `sharded_value_and_grad`).
      old_stats: the statistics before the step (same structure, no leading axis).
      rule: "sequential" or "mean" (see above).
      momentum: the layers' EMA momentum m (Flax convention), for "sequential".
      updates_per_shard: ghost batches per shard, (B / S) / ghost_batch_size, for
        "sequential".

    Returns:
      The merged statistics, structured like ``old_stats``.

    Raises:
      ValueError: an unknown rule, or "sequential" without a momentum in [0, 1] and a
        positive updates_per_shard.

    References:
      Hoffer, Hubara & Soudry (2017), section 4, Algorithm 1 (running statistics
      updated once per ghost batch, in order).
    """
    if rule not in RUNNING_STAT_RULES:
        raise ValueError(
            f"Unknown {rule=}; use 'sequential' (ghost batch norm's default update) or 'mean'."
        )
    if rule == "mean":
        return jax.tree.map(
            lambda new, old: jnp.mean(new, axis=0).astype(old.dtype), shard_stats, old_stats
        )
    if momentum is None or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"rule='sequential' needs the layers' {momentum=} in [0, 1], e.g. 0.9.")
    if (
        isinstance(updates_per_shard, bool)
        or not isinstance(updates_per_shard, int | np.integer)
        or updates_per_shard < 1
    ):
        raise ValueError(
            f"rule='sequential' needs {updates_per_shard=} as a positive integer: the ghost "
            "batches in one shard, (batch_size / shards) / ghost_batch_size."
        )
    decay = float(momentum) ** int(updates_per_shard)

    def merge(new: jax.Array, old: jax.Array) -> jax.Array:
        shards = new.shape[0]
        increments = new - decay * old[None]
        weights = jnp.asarray(decay ** np.arange(shards - 1, -1, -1), new.dtype)
        merged = decay**shards * old + jnp.tensordot(weights, increments, axes=1)
        return merged.astype(old.dtype)

    return jax.tree.map(merge, shard_stats, old_stats)
