"""Sharpness of a minimum: top Hessian eigenvalues and Keskar's epsilon-sharpness.

Keskar et al. (2017) explain the generalization gap by large batches converging to
sharp minima of the training loss; Hoffer et al. (2017) explain it by the smaller
number of updates. This module measures the sharpness of the training loss at given
parameters, over a fixed set of training examples:

* `top_hessian_eigenvalues`: the largest eigenvalues of the Hessian, by Lanczos
  (ARPACK through ``scipy.sparse.linalg.eigsh``) on Hessian-vector products computed
  forward-over-reverse, ``jax.jvp(jax.grad(loss))``, which also differentiates through
  GhostBatchNorm's custom VJP.
* `epsilon_sharpness`: Keskar's metric, the largest relative loss increase inside a
  box around the parameters, found by projected gradient ascent in the box from the
  first-order vertex and from where the top curvature direction leaves the box.
* `model_loss` and `chunk_batches`: the training objective of a zoo model over a
  fixed subset, cut into chunks.

The objective. Every function takes ``loss_fn(params, batch) -> scalar`` and
``batches``, a pytree whose leaves share a leading axis of chunks; the objective is the
mean of ``loss_fn`` over the chunks (``batches=None`` calls ``loss_fn(params, None)``
once, for losses that hold their own data). Gradients and Hessian-vector products are
accumulated chunk by chunk inside one jitted ``lax.scan``, so memory is that of one
chunk whatever the subset size.

Batch norm runs in eval mode (running statistics) by default, for four reasons:

1. The loss is then a plain average of per-example losses, a fixed function of the
   parameters that does not depend on how the subset is cut into batches. In train
   mode each run would be measured on its own normalization group (the ghost batch or
   the whole large batch), so a sharpness difference between runs would mix the
   minimum with the grouping.
2. It is the function whose test error is the generalization gap.
3. Dropout is off, so the loss is deterministic, as Lanczos and the ascent require.
4. The batch gradient is the mean of independent per-example gradients, which the
   noise-scale estimator of `gbn_jax.trainer.noise_scale` assumes.

What eval mode gives up: in train mode the loss is invariant to rescaling the weights
that feed a normalization layer, so those directions are flat and the curvature
elsewhere scales like 1 / |w|^2; with frozen statistics neither holds. Sharpness is
not reparametrization-invariant in either mode (Dinh et al. 2017). ``bn_mode="train"``
is available for comparison: each chunk is then normalized with its own (ghost)
statistics and dropout uses one fixed mask.

References:
  Keskar, Mudigere, Nocedal, Smelyanskiy & Tang, "On large-batch training for deep
  learning: generalization gap and sharp minima", ICLR 2017, section 2.2.2 and
  metric (3) (epsilon-sharpness); Pearlmutter (1994) for Hessian-vector products.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse.linalg
from jax.flatten_util import ravel_pytree

from gbn_jax.ghost_norm import nearest_divisor

__all__ = [
    "BN_MODES",
    "EpsilonSharpness",
    "HessianEigenvalues",
    "chunk_batches",
    "epsilon_sharpness",
    "hessian_vector_product",
    "model_loss",
    "top_hessian_eigenvalues",
]

BN_MODES = ("eval", "train")
EIGEN_WHICH = ("LA", "LM")
# Relative accuracy of the curvature directions that start the epsilon-sharpness
# ascent: they only pick starting points, so a loose tolerance suffices.
_DIRECTION_TOL = 1e-2
# Lanczos vectors kept between ARPACK restarts for small k (scipy's default is 20);
# the first restart only comes after ncv products.
_DEFAULT_NCV = 10
# Projected ascent: the fraction of the first-order gain a step must realize, and the
# step shrinks allowed before a start gives up.
_ARMIJO = 1e-4
_MAX_BACKTRACKS = 8

LossFn = Callable[[Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class HessianEigenvalues:
    """The top eigenvalues of the Hessian of the loss.

    Attributes:
      eigenvalues: the k eigenvalues, largest first (float64).
      eigenvectors: (num_params, k) unit eigenvectors in the order of
        ``ravel_pytree(params)``, column i for eigenvalue i; None unless requested.
      num_hvps: Hessian-vector products ARPACK asked for.
      wall_time_sec: seconds for the whole call, compilation included.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray | None
    num_hvps: int
    wall_time_sec: float


@dataclasses.dataclass(frozen=True)
class EpsilonSharpness:
    """Keskar's epsilon-sharpness at one point.

    Attributes:
      sharpness: 100 (max_y f(x + y) - f(x)) / (1 + f(x)) over the box, in percent.
        The ascent finds a local maximum, so this is a lower bound on the metric.
      loss: f(x), the loss at the parameters.
      max_loss: the largest f(x + y) found inside the box.
      epsilon: the box's relative size.
      num_evaluations: loss-and-gradient evaluations (each one pass over the chunks).
      num_hvps: Hessian-vector products spent on the curvature directions.
      num_starts: vertices the ascent started from.
      iterations: ascent steps taken, over all starts.
      wall_time_sec: seconds for the whole call, compilation included.
    """

    sharpness: float
    loss: float
    max_loss: float
    epsilon: float
    num_evaluations: int
    num_hvps: int
    num_starts: int
    iterations: int
    wall_time_sec: float


def model_loss(
    model: nn.Module,
    batch_stats: Any,
    *,
    bn_mode: str = "eval",
    dropout_seed: int = 0,
) -> LossFn:
    """The mean cross-entropy of a zoo model on one batch, as a function of params.

    Args:
      model: a model of ``gbn_jax.models``.
      batch_stats: its running statistics (``TrainState.batch_stats``); used for the
        normalization in eval mode, ignored (and not updated) in train mode.
      bn_mode: "eval" (running statistics, no dropout; the default, see the module
        docstring) or "train" (each batch normalized with its own statistics, or its
        ghost batches' for GBN models; dropout with one fixed mask per batch shape).
      dropout_seed: the dropout key of train mode.

    Returns:
      ``loss_fn(params, batch) -> float32 scalar`` with batch {"image", "label"}.

    Raises:
      ValueError: for an unknown ``bn_mode``.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(
            f"Unknown {bn_mode=}; use 'eval' (running statistics, the default) or 'train' "
            "(batch statistics)."
        )
    dropout_key = jax.random.PRNGKey(dropout_seed)

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        variables = {"params": params, "batch_stats": batch_stats}
        if bn_mode == "eval":
            logits = model.apply(variables, batch["image"], train=False)
        else:
            logits, _ = model.apply(
                variables,
                batch["image"],
                train=True,
                rngs={"dropout": dropout_key},
                mutable=["batch_stats"],
            )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.mean(losses, dtype=jnp.float32)

    return loss_fn


def chunk_batches(batch: dict[str, Any], chunk_size: int) -> dict[str, Any]:
    """Cuts a subset {"image": (N, ...), "label": (N,)} into chunks of ``chunk_size``.

    Args:
      batch: arrays sharing a leading axis of N examples.
      chunk_size: examples per chunk; must divide N. In train mode it is the group a
        plain batch norm normalizes over; in eval mode it only bounds memory.

    Returns:
      The same dict with every leaf reshaped to (N / chunk_size, chunk_size, ...).

    Raises:
      ValueError: a non-positive chunk size, one that does not divide N, or leaves of
        different lengths.
    """
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(
            f"The arrays of the batch have different lengths {sorted(sizes)}; pass images "
            "and labels of the same examples."
        )
    (n,) = sizes
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be a positive integer, e.g. 256.")
    if n % chunk_size:
        raise ValueError(
            f"{chunk_size=} does not divide the {n} examples; use "
            f"chunk_size={nearest_divisor(n, chunk_size)} or a "
            f"subset of {n - n % chunk_size} examples."
        )
    return jax.tree.map(lambda x: x.reshape(n // chunk_size, chunk_size, *np.shape(x)[1:]), batch)


def hessian_vector_product(
    loss_fn: LossFn, params: Any, batches: Any = None
) -> Callable[[Any], Any]:
    """Returns v -> H v, the Hessian of the chunk-averaged loss at ``params`` times v.

    Forward-over-reverse (``jax.jvp`` of ``jax.grad``), one chunk at a time.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the point (a pytree).
      batches: chunks with a leading axis, or None (see the module docstring).

    Returns:
      A jitted function from a pytree like ``params`` to one like it.
    """

    def hvp(vector: Any, params: Any, batches: Any) -> Any:
        def chunk_hvp(batch):
            grad = jax.grad(lambda p: loss_fn(p, batch))
            return jax.jvp(grad, (params,), (vector,))[1]

        return _chunk_mean(chunk_hvp, batches)

    # The point and the data are arguments, not constants folded into the program.
    jitted = jax.jit(hvp)
    return lambda vector: jitted(vector, params, batches)


def top_hessian_eigenvalues(
    loss_fn: LossFn,
    params: Any,
    batches: Any = None,
    *,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    ncv: int | None = None,
    maxiter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
    compiler_options: dict[str, Any] | None = None,
    callback: Callable[[int], None] | None = None,
) -> HessianEigenvalues:
    """The k largest Hessian eigenvalues of the loss, by Lanczos on HVPs.

    ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``) sees the
    Hessian only through a ``LinearOperator`` whose matvec is one jitted
    Hessian-vector product (float64 on the scipy side, the parameters' dtype inside).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the point (a pytree of float arrays).
      batches: chunks with a leading axis, or None (see the module docstring).
      k: how many eigenvalues, 1 <= k < number of parameters.
      which: "LA", the largest algebraic eigenvalues (the sharpest curvature, the
        default), or "LM", the largest in magnitude (negative ones included).
      tol: ARPACK's relative accuracy of each eigenvalue. Float32 HVPs carry relative
        errors near 1e-6, so much smaller values may not converge.
      ncv: Lanczos vectors kept between restarts (default max(2k + 1, 10), capped at
        the number of parameters).
      maxiter: ARPACK restarts allowed (default: scipy's, 10 n).
      seed: seeds the random start vector, so the result is reproducible.
      return_eigenvectors: also return the eigenvectors (num_params x k float64).
      compiler_options: passed to ``jax.jit`` (e.g. ``steps.compiler_options(config)``
        for the trainer's XLA:CPU options).
      callback: called with the running HVP count after each product (progress bars).

    Returns:
      A `HessianEigenvalues`, eigenvalues largest first.

    Raises:
      ValueError: for a bad k, which, tol, ncv or maxiter, or non-float parameters.
      RuntimeError: when ARPACK does not converge; the message says what to change.
    """
    start = time.perf_counter()
    flat, spec = _flatten(params)
    n = flat.size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(
            f"{k=} must be an integer in [1, {n - 1}] (ARPACK needs k < the {n} parameters)."
        )
    if which not in EIGEN_WHICH:
        raise ValueError(
            f"Unknown {which=}; use 'LA' (largest algebraic, the sharpest curvature) or "
            "'LM' (largest magnitude)."
        )
    if not (isinstance(tol, int | float) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"{tol=} must be a finite number >= 0 (e.g. 1e-3; 0 = machine).")
    if ncv is not None and not (isinstance(ncv, int) and k < ncv <= n):
        raise ValueError(f"{ncv=} must be an integer with k={k} < ncv <= {n}, or None.")
    if maxiter is not None and not (isinstance(maxiter, int) and maxiter >= 1):
        raise ValueError(f"{maxiter=} must be a positive integer (ARPACK restarts) or None.")
    hvp = _flat_hvp(loss_fn, spec, _options_key(compiler_options))
    values, vectors, count = _lanczos(
        lambda v: hvp(flat, jnp.asarray(v, flat.dtype), batches),
        n,
        k=k,
        which=which,
        tol=tol,
        ncv=ncv,
        maxiter=maxiter,
        seed=seed,
        callback=callback,
    )
    return HessianEigenvalues(
        eigenvalues=values,
        eigenvectors=vectors if return_eigenvectors else None,
        num_hvps=count,
        wall_time_sec=time.perf_counter() - start,
    )


def epsilon_sharpness(
    loss_fn: LossFn,
    params: Any,
    batches: Any = None,
    *,
    epsilon: float = 1e-3,
    max_iterations: int = 10,
    num_directions: int = 1,
    directions: np.ndarray | None = None,
    seed: int = 0,
    compiler_options: dict[str, Any] | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> EpsilonSharpness:
    """Keskar's epsilon-sharpness: the largest relative loss increase in a box.

    With x the parameters (flattened) and f the loss,

        phi(x, epsilon) = 100 * (max_{y in C} f(x + y) - f(x)) / (1 + f(x)),
        C = {y : |y_i| <= r_i = epsilon (|x_i| + 1) for every i},

    Keskar's metric (3) in the full parameter space (A = I). The box-constrained
    maximization takes at most ``max_iterations`` projected gradient ascent steps
    (clip to the box, Armijo backtracking, the step doubled after each success) from
    each of these points, and keeps the largest loss seen at any evaluated point:

    * y = r sign(grad f(x)), the vertex that maximizes the first-order model (ties
      to +r);
    * y = +-r u / max|u| for the top ``num_directions`` eigenvectors u of the Hessian
      in box-scaled coordinates, diag(r) H diag(r) (Lanczos, loose tolerance): where
      each direction leaves the box. Near a minimum the gradient is small and the
      curvature decides where the loss rises most; an ascent from the first-order
      vertex alone stops at the nearest local maximum, which at an exact minimum
      (zero gradient) is no rise at all.

    The maximum of a function over a box is NP-hard in general (that of a convex
    quadratic already is), so the result is a lower bound. It is exact for a small
    box (first-order term dominant), for a separable quadratic, and for a quadratic
    whose curvature is one direction (rank one); it comes close when one direction
    dominates, as at the minima of neural networks.

    Keskar et al. solved the maximization with L-BFGS-B; here the ascent runs on the
    device instead, since scipy's L-BFGS-B handles the per-coordinate bounds of a
    network's millions of parameters in Python.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the point x (a pytree of float arrays).
      batches: chunks with a leading axis, or None (see the module docstring).
      epsilon: the box's relative half-width, > 0 (Keskar et al. report 1e-3 and 5e-4).
      max_iterations: accepted ascent steps from each start, >= 1.
      num_directions: curvature directions to start from, >= 0 (0: the first-order
        vertex only, no Hessian-vector products).
      directions: (num_params, m) directions in box coordinates to start from instead
        of computing ``num_directions`` of them, e.g. the eigenvectors of
        `top_hessian_eigenvalues`: where most |x_i| << 1, as for the weights of a
        network, diag(|x| + 1) is close to the identity and they nearly coincide.
        One Lanczos run then serves every epsilon.
      seed: seeds the Lanczos start vector.
      compiler_options: passed to ``jax.jit``.
      callback: called as ``callback(evaluations, best_loss)`` after each loss
        evaluation.

    Returns:
      An `EpsilonSharpness`.

    Raises:
      ValueError: for a bad epsilon, max_iterations, num_directions or directions,
        non-float parameters, or a non-finite loss at ``params``.
    """
    start = time.perf_counter()
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"{epsilon=} must be a finite positive number, e.g. 1e-3 or 5e-4.")
    for name, value, low in (
        ("max_iterations", max_iterations, 1),
        ("num_directions", num_directions, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
    flat, spec = _flatten(params)
    if num_directions >= flat.size:
        raise ValueError(
            f"{num_directions=} must be smaller than the {flat.size} parameters (ARPACK)."
        )
    if directions is not None:
        shape = np.shape(directions)
        if len(shape) != 2 or shape[0] != flat.size or not np.all(np.isfinite(directions)):
            raise ValueError(
                f"directions has shape {shape}; pass finite columns of length {flat.size} "
                "(e.g. top_hessian_eigenvalues(..., return_eigenvectors=True).eigenvectors), "
                "or None to compute them."
            )

    evaluate = _flat_value_and_grad(loss_fn, spec, _options_key(compiler_options))
    scale = np.abs(np.asarray(flat, np.float64)) + 1.0
    radius = jnp.asarray(epsilon * scale, flat.dtype)
    count = 0
    best = -math.inf

    def evaluate_box(z: jax.Array) -> tuple[float, jax.Array]:
        """f(x + r z) and its gradient in box coordinates z in [-1, 1]^n."""
        nonlocal count, best
        value, grad = evaluate(flat, radius * z, batches)
        value = float(value)
        count += 1
        if math.isfinite(value):
            best = max(best, value)
        if callback is not None:
            callback(count, best)
        return value, radius * grad

    loss0, grad0 = evaluate_box(jnp.zeros_like(flat))
    if not math.isfinite(loss0):
        raise ValueError(
            f"The loss at the parameters is {loss0}; sharpness needs a finite loss. Check "
            "that the checkpoint did not diverge and that the batches are valid."
        )
    starts = [jnp.asarray(_sign(np.asarray(grad0)), flat.dtype)]
    num_hvps = 0
    if directions is None and num_directions:
        # In box coordinates y = diag(r) z the Hessian is diag(r) H diag(r); r is
        # epsilon (|x| + 1), so the eigenvectors do not depend on epsilon.
        hvp = _flat_hvp(loss_fn, spec, _options_key(compiler_options))
        _, directions, num_hvps = _lanczos(
            lambda v: scale * np.asarray(hvp(flat, jnp.asarray(scale * v, flat.dtype), batches)),
            flat.size,
            k=num_directions,
            which="LA",
            tol=_DIRECTION_TOL,
            seed=seed,
        )
    if directions is not None:
        for u in np.asarray(directions, np.float64).T:
            # From the point where the direction meets the box, not from its rounding to
            # a vertex: the coordinates that stay inside then move by their gradient,
            # which carries the curvature's coupling to the others.
            touch = jnp.asarray(u / np.max(np.abs(u)), flat.dtype)
            starts += [touch, -touch]
    iterations = sum(_projected_ascent(evaluate_box, z, max_iterations) for z in starts)
    return EpsilonSharpness(
        sharpness=100.0 * (best - loss0) / (1.0 + loss0),
        loss=loss0,
        max_loss=best,
        epsilon=float(epsilon),
        num_evaluations=count,
        num_hvps=num_hvps,
        num_starts=len(starts),
        iterations=iterations,
        wall_time_sec=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------
# Helpers.


def _flatten(params: Any) -> tuple[jax.Array, tuple]:
    """Flattens float parameters into one vector (the order of ``ravel_pytree``).

    Returns the vector and a hashable description of the layout (see `_unravel`).
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params is empty; pass the model parameters (a pytree of arrays).")
    dtypes = [np.dtype(getattr(x, "dtype", None) or np.result_type(x)) for x in leaves]
    bad = [dtype for dtype in dtypes if not jnp.issubdtype(dtype, jnp.floating)]
    if bad:
        raise ValueError(
            f"params must hold floating arrays only, found dtype {bad[0]}; pass "
            "state.params, not the whole train state."
        )
    flat, _ = ravel_pytree(params)
    spec = (
        jax.tree.structure(params),
        tuple((tuple(np.shape(x)), dtype.str) for x, dtype in zip(leaves, dtypes, strict=True)),
    )
    return flat, spec


def _unravel(spec: tuple) -> Callable[[jax.Array], Any]:
    """The inverse of ``ravel_pytree`` for parameters of this structure and shapes."""
    treedef, leaves = spec
    template = jax.tree.unflatten(treedef, [np.zeros(shape, dtype) for shape, dtype in leaves])
    return ravel_pytree(template)[1]


def _options_key(compiler_options: dict[str, Any] | None) -> tuple:
    return tuple(sorted((compiler_options or {}).items()))


@functools.lru_cache(maxsize=8)
def _flat_hvp(
    loss_fn: LossFn, spec: tuple, options: tuple
) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """Jitted (w, v, batches) -> H(w) v on flat vectors, forward-over-reverse.

    Cached per loss and parameter layout, so that repeated measurements of one model
    (several epsilons, several checkpoints) compile once.
    """
    unravel = _unravel(spec)

    def flat_hvp(w: jax.Array, v: jax.Array, batches: Any) -> jax.Array:
        def chunk_hvp(batch):
            grad = jax.grad(lambda u: loss_fn(unravel(u), batch))
            return jax.jvp(grad, (w,), (v,))[1]

        return _chunk_mean(chunk_hvp, batches)

    # The point and the data are arguments: as closure constants XLA would try to
    # fold the first layers' products at compile time (tens of seconds for F1).
    return jax.jit(flat_hvp, compiler_options=dict(options) or None)


@functools.lru_cache(maxsize=8)
def _flat_value_and_grad(
    loss_fn: LossFn, spec: tuple, options: tuple
) -> Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array]]:
    """Jitted (x, y, batches) -> (f(x + y), grad f(x + y)) on flat vectors, cached."""
    unravel = _unravel(spec)

    def value_and_grad(x: jax.Array, y: jax.Array, batches: Any):
        def chunk(batch):
            return jax.value_and_grad(lambda u: loss_fn(unravel(u), batch))(x + y)

        return _chunk_mean(chunk, batches)

    return jax.jit(value_and_grad, compiler_options=dict(options) or None)


def _lanczos(
    matvec: Callable[[np.ndarray], Any],
    n: int,
    *,
    k: int,
    which: str,
    tol: float,
    seed: int,
    ncv: int | None = None,
    maxiter: int | None = None,
    callback: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """ARPACK on a symmetric matvec: (eigenvalues, eigenvectors, matvec count), sorted."""
    if ncv is None:
        ncv = min(n, max(2 * k + 1, _DEFAULT_NCV))
    count = 0

    def counted(v: np.ndarray) -> np.ndarray:
        nonlocal count
        out = np.asarray(matvec(np.ravel(v)), np.float64)
        count += 1
        if callback is not None:
            callback(count)
        return out

    operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=counted, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    try:
        values, vectors = scipy.sparse.linalg.eigsh(
            operator, k=k, which=which, tol=tol, ncv=ncv, maxiter=maxiter, v0=v0
        )
    except scipy.sparse.linalg.ArpackNoConvergence as error:
        raise RuntimeError(
            f"Lanczos did not converge after {count} Hessian-vector products "
            f"({len(error.eigenvalues)} of {k} eigenvalues converged). Loosen tol={tol}, "
            f"raise maxiter={maxiter} or ncv={ncv}, or ask for fewer eigenvalues."
        ) from None
    order = np.argsort(values)[::-1] if which == "LA" else np.argsort(-np.abs(values))
    return np.asarray(values[order], np.float64), np.asarray(vectors[:, order]), count


def _projected_ascent(
    evaluate_box: Callable[[jax.Array], tuple[float, jax.Array]],
    z: jax.Array,
    max_iterations: int,
) -> int:
    """Projected gradient ascent in the box [-1, 1]^n; returns the steps taken.

    Each step z <- clip(z + t g) must raise F by an Armijo fraction of the first-order
    gain g . (z_new - z); the step length t doubles after a success and shrinks by 4
    after a failure. Stops after ``max_iterations`` steps, at a point where the
    projected gradient vanishes (every coordinate on a face its gradient pushes
    against, or a stationary interior point), or after _MAX_BACKTRACKS failures.
    """
    value, grad = evaluate_box(z)
    largest = float(jnp.max(jnp.abs(grad)))
    if not largest > 0:
        return 0
    step = 1.0 / largest  # the fastest coordinate may cross half the box
    taken = 0
    while taken < max_iterations:
        for _ in range(_MAX_BACKTRACKS):
            candidate = jnp.clip(z + step * grad, -1.0, 1.0)
            gain = float(jnp.vdot(grad, candidate - z))
            if not gain > 0:
                return taken  # nothing left to gain to first order: a KKT point
            new_value, new_grad = evaluate_box(candidate)
            if new_value >= value + _ARMIJO * gain:
                z, value, grad = candidate, new_value, new_grad
                step *= 2.0
                taken += 1
                break
            step *= 0.25
        else:
            return taken
    return taken


def _sign(v: np.ndarray) -> np.ndarray:
    """Sign with ties to +1, so that every coordinate of the start lies on the box."""
    return np.where(np.asarray(v) >= 0, 1.0, -1.0)


def _chunk_mean(fn: Callable[[Any], Any], batches: Any) -> Any:
    """Mean of ``fn(chunk)`` over the leading axis of ``batches`` (one chunk in memory)."""
    if batches is None:
        return fn(None)
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batches)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"Every leaf of batches needs the same leading (chunk) axis; got lengths "
            f"{sorted(sizes, key=str)}. Build them with chunk_batches(subset, chunk_size)."
        )
    (num_chunks,) = sizes
    if num_chunks == 0:
        raise ValueError("batches holds no chunk; pass at least one.")
    first = jax.tree.map(lambda x: x[0], batches)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))

    def body(total, chunk):
        return jax.tree.map(jnp.add, total, fn(chunk)), None

    total, _ = jax.lax.scan(body, zeros, batches)
    return jax.tree.map(lambda t: t / num_chunks, total)
