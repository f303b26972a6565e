"""The train state and the jitted programs the trainer dispatches: steps, loops, evaluation.

Construction lives here; the loop that drives it is ``gbn_jax.trainer.train``. Every function
returns a pure function for the caller to jit with its shardings:

* `make_train_step`: one update (forward, backward, optimizer), as the paper's step.
* `make_train_loop`: K steps in one program, each reading its batch through a feed
  (gbn_jax/trainer/data/feed.py) and adding its metrics to an on-device accumulator, so the host
  dispatches once per K steps and reads nothing between its log, eval and checkpoint
  boundaries. A ``lax.scan`` over the K rows of a chunk (a static trip count: no host
  round trip per step on a GPU), or a ``fori_loop`` over its first n rows for chunks cut
  short at a boundary (one program for every n < K), or, on the CPU (`device_loop`
  off), one row per program with no loop, dispatched n times: XLA:CPU lays convolutions
  out for its fast kernels only outside loop bodies. All run the same step, so K and
  the mode change nothing in the numbers: they agree bit for bit (tests/test_train.py).
* `make_eval_pass`: the evaluation of a whole device-resident split in one program.
* `make_noise_scale_measurement`: B_simple from one batch, a program of its own that
  reads the state and changes nothing (``config.noise_scale``).

References:
  Hoffer, Hubara & Soudry (2017): section 3 (||w_t - w_0||), sections 4-5 (the step).
"""

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gbn_jax.models.base import conv_input_barriers
from gbn_jax.models.norm import example_mask
from gbn_jax.trainer import noise_scale

# XLA:CPU compiler options of the train step (``config.xla_cpu_fast_options``, on by
# default; other backends ignore it), each from a profile of the step on a 2-core CPU
# (the trainer's throughput with and without each: docs/performance.md):
# * YNNPACK keeps the reductions but dots and convolutions go to XLA's Eigen kernels,
#   which ran ResNet-44's weight-gradient convolutions faster.
# * The optimization-barrier expander is off, so the barriers that programs traced in
#   `tracing` place at ``models.base.conv_input`` survive to stop fusion from
#   recomputing the residual stream inside every weight-gradient transpose.
# Only kernels and fusion change: results agree to float32 rounding, not bitwise, so
# the options stay as the committed CPU results were trained with them.
XLA_CPU_FAST_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
    "xla_disable_hlo_passes": "cse_barrier_expander",
}


@flax.struct.dataclass
class TrainState:
    """Everything that evolves during training (and is checkpointed).

    Attributes:
      step: number of updates taken so far (int32 scalar).
      params: model parameters.
      batch_stats: running statistics of the normalization layers.
      opt_state: optimizer state.
      params0: the parameters at step 0, for the weight distance ||w_t - w_0||.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    params0: Any


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
) -> TrainState:
    """Initializes the model and optimizer (pure: jit it with ``out_shardings``).

    Args:
      rng: PRNG key for parameter initialization (and init-time dropout).
      model: a model of ``gbn_jax.models``.
      tx: the optimizer (``ResolvedRegime.optimizer()``).
      image_shape: shape of one example, e.g. (28, 28, 1).

    Returns:
      The step-0 TrainState.

    References:
      Hoffer, Hubara & Soudry (2017), section 3 (w_0 kept for ||w_t - w_0||).
    """
    params_rng, dropout_rng = jax.random.split(rng)
    variables = model.init(
        {"params": params_rng, "dropout": dropout_rng},
        jnp.zeros((1, *image_shape), jnp.float32),
        train=False,
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        params0=params,
    )


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """XLA compiler options for the train step: XLA_CPU_FAST_OPTIONS on the CPU.

    Trace the programs compiled with them inside ``tracing(options)``.

    Args:
      config: the experiment config; ``xla_cpu_fast_options`` (default True) set to
        False compiles with XLA's defaults.

    Returns:
      The options for ``jax.jit(..., compiler_options=...)``; empty off the CPU or
      when the config turns them off.
    """
    if config.get("xla_cpu_fast_options", True) and jax.default_backend() == "cpu":
        return dict(XLA_CPU_FAST_OPTIONS)
    return {}


def tracing(options: dict[str, Any] | None) -> contextlib.AbstractContextManager[None]:
    """The context to trace (lower) a program in that compiles with ``options``.

    With XLA's optimization-barrier expander disabled (`XLA_CPU_FAST_OPTIONS`), the
    models place barriers at their convolution inputs (``models.base.conv_input``);
    with any other options, none (XLA would expand them away). Give ``jax.jit`` the same
    options: JAX reuses a function's trace under the same jit settings, so a function
    jitted alike inside and outside the context would keep its first trace.

    Args:
      options: the program's compiler options (`compiler_options`).

    Returns:
      A context manager: ``with steps.tracing(options): jax.jit(f, compiler_options=
      options).lower(...)``, or around a jitted function's first call.
    """
    disabled = str((options or {}).get("xla_disable_hlo_passes", "")).split(",")
    return conv_input_barriers("cse_barrier_expander" in disabled)


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The mean over the real examples (``mask`` True), or over all without a mask."""
    if mask is None:
        return jnp.mean(values)
    weights = mask.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def train_loss(
    model: nn.Module, params: Any, batch_stats: Any, batch: dict, rng: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    """The training loss of one batch, normalization layers in train mode.

    Args:
      model: a model of ``gbn_jax.models``.
      params: the parameters to differentiate.
      batch_stats: the running statistics before the step.
      batch: {"image", "label"[, "mask"]}; masked-out examples count for nothing.
      rng: the dropout key.

    Returns:
      ``(loss, (logits, new_vars))``: the mean cross-entropy over the real examples,
      the logits, and the updated ``batch_stats`` collection.

    References:
      Hoffer, Hubara & Soudry (2017), section 4 (statistics of each ghost batch).
    """
    mask = batch.get("mask")
    with example_mask(mask):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return _masked_mean(loss, mask), (logits, new_vars)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Builds the pure training step; callers jit it with their shardings.

    On a CPU, jit it with ``compiler_options=compiler_options(config)`` and trace it
    inside ``tracing(options)``, as the trainer does (see XLA_CPU_FAST_OPTIONS).

    Args:
      model: a model of ``gbn_jax.models``.
      tx: the optimizer; weight decay and clipping live in it, not in the loss.
      learning_rate_fn: the schedule inside ``tx``, only to report the step's rate.

    Returns:
      ``train_step(state, batch, rng) -> (state, metrics)`` with metrics ``loss``
      (mean cross-entropy), ``accuracy``, ``grad_norm`` (global L2 norm before
      clipping) and ``learning_rate`` (the rate of this update), float32 scalars. A
      batch with a ``"mask"`` (the padded partial batch of an epoch) averages the loss
      over its real examples and leaves the padding out of every normalization
      layer's statistics (``models.norm.example_mask``).

    References:
      Hoffer, Hubara & Soudry (2017), section 5 (SGD with momentum and clipping).
    """

    def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
        def loss_fn(params):
            return train_loss(model, params, state.batch_stats, batch, rng)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, new_vars)), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        correct = jnp.argmax(logits, -1) == batch["label"]
        metrics = {
            "loss": loss,
            "accuracy": _masked_mean(correct, batch.get("mask")).astype(jnp.float32),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=new_vars.get("batch_stats", state.batch_stats),
            opt_state=opt_state,
        )
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[TrainState, dict], dict]:
    """Builds the evaluation step: sums over the unmasked examples of one batch.

    Args:
      model: a model of ``gbn_jax.models``.

    Returns:
      ``eval_step(state, batch) -> {"loss": sum, "correct": sum, "count": sum}``;
      padded examples (``batch["mask"]`` False) count for nothing.

    References:
      Hoffer, Hubara & Soudry (2017), section 5 (validation accuracy).
    """

    def eval_step(state: TrainState, batch: dict) -> dict:
        logits = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats},
            batch["image"],
            train=False,
        )
        mask = batch["mask"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {
            "loss": jnp.sum(loss * mask),
            "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


def weight_distance(params: Any, params0: Any) -> jax.Array:
    """||w_t - w_0||: the L2 distance of all parameters from their initial values.

    Args:
      params: current parameters.
      params0: parameters at step 0.

    Returns:
      A float32 scalar.

    References:
      Hoffer, Hubara & Soudry (2017), section 3 ("random walk on a random potential").
    """
    diffs = jax.tree.map(
        lambda p, p0: jnp.sum(jnp.square(p - p0), dtype=jnp.float32), params, params0
    )
    return jnp.sqrt(sum(jax.tree.leaves(diffs)))


# ---------------------------------------------------------------------------------------
# Several steps per dispatch.
# ---------------------------------------------------------------------------------------


def zero_metrics() -> dict[str, jax.Array]:
    """The empty train-metrics accumulator (sums since the last log, on the device).

    Returns:
      {"loss", "accuracy", "grad_norm": float32 sums, "count": int32 steps,
      "learning_rate": float32 (of the last step), "first_bad_step": int32 (-1: none)}.
    """
    zero = jnp.zeros((), jnp.float32)
    return {
        "loss": zero,
        "accuracy": zero,
        "grad_norm": zero,
        "count": jnp.zeros((), jnp.int32),
        "learning_rate": zero,
        "first_bad_step": jnp.full((), -1, jnp.int32),
    }


def accumulate_metrics(acc: dict, metrics: dict, step: jax.Array) -> dict:
    """Adds one step's metrics to the accumulator.

    Args:
      acc: from `zero_metrics` or a previous call.
      metrics: the step's metrics (`make_train_step`).
      step: the step count after the update, recorded as the first bad step when the
        loss or the gradient norm is not finite.

    Returns:
      The new accumulator.
    """
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return {
        "loss": acc["loss"] + metrics["loss"],
        "accuracy": acc["accuracy"] + metrics["accuracy"],
        "grad_norm": acc["grad_norm"] + metrics["grad_norm"],
        "count": acc["count"] + 1,
        "learning_rate": metrics["learning_rate"],
        "first_bad_step": jnp.where(
            (acc["first_bad_step"] < 0) & ~finite, step, acc["first_bad_step"]
        ),
    }


def make_train_loop(
    train_step: Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]],
    batch_fn: Callable[[Any, Any], dict],
    dropout_rng: jax.Array,
) -> Callable[..., tuple[TrainState, dict, jax.Array]]:
    """Builds the K-steps-per-dispatch program (pure: jit it with the state donated).

    Args:
      train_step: from `make_train_step`.
      batch_fn: ``batch_fn(arrays, x) -> batch`` (``TrainFeed.batch``): one step's
        batch from the arrays handed to every dispatch and the step's row of the chunk.
      dropout_rng: the run's dropout key; step t uses ``fold_in(dropout_rng, t)``, so a
        resumed run draws the same keys.

    Returns:
      ``train_loop(state, acc, arrays, xs, num_steps=None, *, row=None) -> (state, acc,
      step)``: runs one step per row of ``xs`` (a pytree with a leading axis of K rows);
      with an int32 ``num_steps``, the first ``num_steps`` rows only; with an int32
      ``row``, that row only, with no loop around the step (``device_loop`` off, see
      `compile_train_loop`). ``step`` is the state's step count once more (an output
      the next dispatch does not donate, for the host to wait on).

    References:
      Hoffer, Hubara & Soudry (2017), section 5.
    """

    def one_step(state: TrainState, acc: dict, arrays: Any, x: Any) -> tuple[TrainState, dict]:
        batch = batch_fn(arrays, x)
        state, metrics = train_step(state, batch, jax.random.fold_in(dropout_rng, state.step))
        return state, accumulate_metrics(acc, metrics, state.step)

    def row_of(xs, i):
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), xs)

    def train_loop(state, acc, arrays, xs, num_steps=None, *, row=None):
        if row is not None:
            state, acc = one_step(state, acc, arrays, row_of(xs, row))
        elif num_steps is None:

            def body(carry, x):
                return one_step(*carry, arrays, x), None

            (state, acc), _ = jax.lax.scan(body, (state, acc), xs)
        else:

            def body(i, carry):
                return one_step(*carry, arrays, row_of(xs, i))

            state, acc = jax.lax.fori_loop(0, num_steps, body, (state, acc))
        return state, acc, state.step

    return train_loop


def device_loop(config: ml_collections.ConfigDict) -> bool:
    """``config.device_loop``, or (unset) whether the backend is an accelerator.

    Off, each step of a dispatch is its own program: XLA:CPU gives a convolution the
    layout its Eigen kernel needs only in a program's entry computation, not inside a
    loop body, so on the CPU a ResNet step in a ``fori_loop`` runs many times slower
    than alone (README, the trainer's loop).
    """
    setting = config.get("device_loop")
    if setting is not None:
        return bool(setting)
    return jax.default_backend() != "cpu"


def compile_train_loop(
    train_loop: Callable[..., tuple[TrainState, dict, jax.Array]],
    state_shapes: Any,
    acc_shapes: Any,
    arrays: Any,
    chunk_shapes: Any,
    *,
    compiler_options: dict[str, Any],
    device_loop: bool,
    scan: bool,
) -> Callable[..., tuple[TrainState, dict, jax.Array]]:
    """Compiles a `make_train_loop` program before its inputs exist, state donated.

    Args:
      train_loop: from `make_train_loop`.
      state_shapes: the TrainState as ShapeDtypeStructs with shardings (kept on output).
      acc_shapes: the accumulator likewise.
      arrays: the arrays handed to every dispatch (``TrainFeed.arrays``).
      chunk_shapes: ``TrainFeed.chunk_shapes(K)``.
      compiler_options: XLA options (`compiler_options`).
      device_loop: run a chunk's steps in one program (a loop on the device); False:
        one program per step, dispatched back to back (`device_loop`).
      scan: with ``device_loop``, also compile the K-row scan (worth it on
        accelerators, see the module docstring).

    Returns:
      ``run(state, acc, arrays, xs, n) -> (state, acc, step)``: the first n rows of the
      chunk ``xs``, as one dispatch (the K-row scan when n = K and ``scan``, else the
      ``fori_loop``) or, without ``device_loop``, as n dispatches of one step each. The
      numbers are the same either way, bit for bit (tests/test_steps.py).
    """
    sharding = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    step_sharding = state_shapes.step.sharding
    jit = functools.partial(
        jax.jit,
        out_shardings=(sharding(state_shapes), sharding(acc_shapes), step_sharding),
        donate_argnums=(0, 1),
        compiler_options=compiler_options or None,
    )
    args = (state_shapes, acc_shapes, arrays, chunk_shapes)
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=step_sharding)
    length = jax.tree.leaves(chunk_shapes)[0].shape[0]  # K
    if not device_loop:
        with tracing(compiler_options):
            one = jit(lambda *a: train_loop(*a[:4], row=a[4])).lower(*args, index)
        one = one.compile()
        # The row numbers live on the device, so a dispatch moves no host scalar.
        rows = [jax.device_put(np.int32(i), step_sharding) for i in range(length)]

        def run(state, acc, arrays, xs, n):
            for i in range(n):
                state, acc, step = one(state, acc, arrays, xs, rows[i])
            return state, acc, step

        return run

    with tracing(compiler_options):
        first_n_rows = jit(train_loop).lower(*args, index)
        whole_chunk = jit(lambda *a: train_loop(*a)).lower(*args) if scan else None
    first_n_rows, whole_chunk = first_n_rows.compile(), whole_chunk and whole_chunk.compile()

    def run(state, acc, arrays, xs, n):
        if n == length and whole_chunk is not None:
            return whole_chunk(state, acc, arrays, xs)
        return first_n_rows(state, acc, arrays, xs, np.int32(n))

    return run


def make_eval_pass(
    eval_step: Callable[[TrainState, dict], dict],
    batch_fn: Callable[[Any, Any], dict],
) -> Callable[[TrainState, Any, Any], dict]:
    """Builds the evaluation of a whole device-resident split in one program.

    Args:
      eval_step: from `make_eval_step`.
      batch_fn: ``batch_fn(arrays, x) -> batch`` (``EvalFeed.batch``).

    Returns:
      ``eval_pass(state, arrays, xs) -> {"loss", "correct", "count"}``: sums over the
      split, batch after batch in order (the padding of the last one masked out).

    References:
      Hoffer, Hubara & Soudry (2017), section 5 (validation accuracy).
    """

    def eval_pass(state: TrainState, arrays: Any, xs: Any) -> dict:
        def body(sums, x):
            batch_sums = eval_step(state, batch_fn(arrays, x))
            return jax.tree.map(jnp.add, sums, batch_sums), None

        zero = jnp.zeros((), jnp.float32)
        sums, _ = jax.lax.scan(body, {"loss": zero, "correct": zero, "count": zero}, xs)
        return sums

    return eval_pass


# ---------------------------------------------------------------------------------------
# The gradient noise scale, measured beside the training.
# ---------------------------------------------------------------------------------------


def make_noise_scale_measurement(
    model: nn.Module,
    batch_fn: Callable[[Any, Any], dict],
    dropout_rng: jax.Array,
    mesh: jax.sharding.Mesh,
    *,
    small_batch_size: int,
    vectorize: bool = False,
) -> Callable[[TrainState, Any, Any], dict[str, jax.Array]]:
    """Builds the B_simple measurement of the trainer (pure: jit it, nothing donated).

    At a measured step t (the state after t updates) it takes the batch that update
    t + 1 trains on: row 0 of the next dispatch's chunk, built by ``batch_fn`` exactly
    as the loop builds it (same examples, same augmentation). It cuts that batch of B
    examples into B / b shards of b = ``small_batch_size`` in batch order and takes each
    shard's gradient of the training loss (`train_loss`: normalization in train mode as
    the step sees it, so each ghost batch normalizes over its own examples; plain batch
    norm normalizes over the shard; the running-statistics updates are discarded). The
    dropout key is the step's own, ``fold_in(dropout_rng, t)``, folded with the shard
    index: read, not drawn, so the training's keys are untouched. The gradients come
    from `noise_scale.sharded_value_and_grad` (each device its B / devices examples as
    micro-batches of b: side by side under vmap with ``vectorize``, for accelerators,
    where b-sized kernels one after another would leave them idle; else one after
    another in a rolled loop), the estimates from `noise_scale.estimate_from_norms`.
    Either way one copy of the model is compiled.

    Nothing it computes flows back into the training: the trainer dispatches it as a
    separate program before the step's own and logs what it returns, so parameters,
    statistics, optimizer state and the train metrics are the same bit for bit with it
    or without. Its cost is one more forward and backward pass of one batch (in
    smaller pieces) per measurement, about 1 / N of the step time at one measurement
    every N steps.

    Args:
      model: a model of ``gbn_jax.models``.
      batch_fn: ``batch_fn(arrays, x) -> batch`` (``TrainFeed.batch``).
      dropout_rng: the run's dropout key (`make_train_loop`'s).
      mesh: the trainer's mesh; the batch is sharded over its "data" axis.
      small_batch_size: b; it must divide the per-device batch, and ghost batches must
        divide it (``train.validate_config`` checks both).
      vectorize: micro-batches under vmap (memory: one gradient per micro-batch).

    Returns:
      ``measure(state, arrays, xs) -> metrics``: float32 scalars ``noise_sq_norm_small``
      (|G_small|^2, the mean over shards of |g_s|^2), ``noise_sq_norm_big`` (|G_big|^2
      of the whole batch's gradient), ``noise_grad_sq`` (the unbiased |G|^2),
      ``noise_trace_sigma`` (tr(Sigma)) and ``noise_b_simple`` (their ratio at this
      step; over an interval, sum ``noise_trace_sigma`` and ``noise_grad_sq`` first and
      divide the sums: `noise_scale.simple_noise_scale`).

    References:
      McCandlish et al. (2018), section 2.2 and appendix A.1.
    """

    def loss_fn(params, batch, batch_stats, *, rng):
        loss, _ = train_loss(model, params, batch_stats, batch, rng)
        return loss

    def measure(state: TrainState, arrays: Any, xs: Any) -> dict[str, jax.Array]:
        batch = batch_fn(arrays, jax.tree.map(lambda a: a[0], xs))
        batch_size = batch["label"].shape[0]
        micro_batches = batch_size // mesh.shape["data"] // small_batch_size
        grad_fn = noise_scale.sharded_value_and_grad(
            loss_fn, mesh, micro_batches=micro_batches, unroll=1, vectorize=vectorize
        )
        rng = jax.random.fold_in(dropout_rng, state.step)
        _, _, est = grad_fn(state.params, batch, state.batch_stats, rng=rng)
        return {
            "noise_sq_norm_small": est.sq_norm_small,
            "noise_sq_norm_big": est.sq_norm_big,
            "noise_grad_sq": est.grad_sq,
            "noise_trace_sigma": est.trace_sigma,
            "noise_b_simple": est.trace_sigma / est.grad_sq,
        }

    return measure
