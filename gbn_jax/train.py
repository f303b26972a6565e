"""Data-parallel trainer: one jitted step over a 1-D "data" mesh, resumable, multi-host.

``train_and_evaluate(config, workdir)`` runs one column of the paper's table from an
experiment config (``configs/*.py``). Sections, in order: mesh -> data -> model and
optimizer -> step functions -> checkpoint restore -> loop.

* Parameters, batch statistics and optimizer state are replicated; every batch is
  sharded over the "data" axis. GSPMD inserts the gradient all-reduce; ghost batch
  norm needs none when each device holds whole ghost batches.
* Nothing is fetched from the device between logging steps: train metrics are summed
  on the device and averaged when logged, so the host runs ahead of the device.
* Resumption is exact: the checkpoint holds the train state (with the step-0
  parameters for the weight distance), and the data iterator's state; dropout keys
  are ``fold_in(key, step)``. metrics.jsonl is cut back to the restored step (the
  TensorBoard files are not: a resumed run starts a new event file).
* Outputs in ``workdir``: config.json, regime.json, metrics.jsonl (one JSON object per
  logged step, process 0), tb/ (TensorBoard), checkpoints/ (orbax), summary.json.

References:
  Hoffer, Hubara & Soudry (2017): section 3 (||w_t - w_0||, logged as
  ``weight_distance``), sections 4-5 (the regimes resolved by ``gbn_jax.regimes``).
"""

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gbn_jax import checkpointing, input_pipeline, models, regimes
from gbn_jax.models.norm import example_mask

LOG_SCHEDULES = ("linear", "log")
# XLA:CPU compiler options of the train step (``config.xla_cpu_fast_options``, on by
# default; other backends ignore it), each from a profile of the step on the 2-core AMD
# EPYC of experiments/results:
# * YNNPACK keeps the reductions but dots and convolutions go to XLA's Eigen kernels:
#   Eigen ran F1's 4096x512 @ 512x512 matmuls 0.87-0.90x torch's time against
#   YNNPACK's 1.16-1.17x, and a ResNet-44 weight-gradient convolution 35 ms against
#   286 ms (batch 256, 32x32x16).
# * The optimization-barrier expander is off, so the barriers of
#   ``models.base.conv_input`` survive to stop fusion from recomputing the residual
#   stream inside every weight-gradient transpose (ResNet-44 step 4.6 s -> 2.2 s).
# Only kernels and fusion change: results agree to float32 rounding, not bitwise.
XLA_CPU_FAST_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
    "xla_disable_hlo_passes": "cse_barrier_expander",
}
# Fields of a metrics.jsonl record that measure the machine, not the training.
WALL_CLOCK_FIELDS = ("examples_per_sec",)


class NonFiniteLossError(FloatingPointError):
    """The training loss or the parameters became NaN or infinite."""


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


def keep_host_allocations() -> bool:
    """Makes glibc malloc reuse large host buffers instead of mapping fresh pages.

    XLA:CPU allocates each step's temporaries (129 MB for F1 at batch 4096) as one
    buffer on a PjRt worker thread; glibc serves it with mmap and returns it with
    munmap, so every step page-faults the whole buffer in again (33k faults, 60-90 ms
    of kernel time per F1 step on 2 cores). This puts every thread on the main arena
    and raises the mmap and trim thresholds to 1 GiB, so the buffer stays in the heap
    and is reused. Process-wide and irreversible; call it before the first JAX
    computation (before the CPU client starts its threads), e.g. in the CLI. A no-op
    (returns False) where libc has no ``mallopt`` (not glibc).

    Returns:
      Whether the settings were applied.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return all(
        mallopt(option, value) == 1
        for option, value in (
            (m_arena_max, 1),
            (m_mmap_threshold, 1 << 30),
            (m_trim_threshold, 1 << 30),
        )
    )


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """XLA compiler options for the train step: XLA_CPU_FAST_OPTIONS on the CPU.

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


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Builds the pure training step; callers jit it with their shardings.

    On a CPU, jit it with ``compiler_options=compiler_options(config)`` as the trainer
    does: XLA's own options run the ResNets 2.6-3x slower (see XLA_CPU_FAST_OPTIONS).

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
        mask = batch.get("mask")

        def mean(values):
            if mask is None:
                return jnp.mean(values)
            weights = mask.astype(jnp.float32)
            return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)

        def loss_fn(params):
            with example_mask(mask):
                logits, new_vars = model.apply(
                    {"params": params, "batch_stats": state.batch_stats},
                    batch["image"],
                    train=True,
                    rngs={"dropout": rng},
                    mutable=["batch_stats"],
                )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return mean(loss), (logits, new_vars)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, new_vars)), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {
            "loss": loss,
            "accuracy": mean(jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
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


def log_spaced_steps(total_steps: int, per_decade: int = 20) -> set[int]:
    """Steps 1, ..., total_steps spaced evenly on a log axis, ~per_decade per decade.

    Args:
      total_steps: the last step.
      per_decade: points per factor of 10 (fewer at the start, where steps collide).

    Returns:
      A set of steps.

    References:
      Hoffer, Hubara & Soudry (2017), section 3 (||w_t - w_0|| ~ log t).

    >>> sorted(log_spaced_steps(20, per_decade=5))
    [1, 2, 3, 4, 6, 10, 16]
    """
    steps, k = set(), 0
    while (step := round(10 ** (k / per_decade))) <= total_steps:
        steps.add(step)
        k += 1
    return steps


def validate_config(
    config: ml_collections.ConfigDict, *, device_count: int, process_count: int
) -> None:
    """Checks a config before any compute; every message names the value and the fix.

    Args:
      config: the experiment config.
      device_count: devices of all processes.
      process_count: number of processes.

    Raises:
      ValueError: a bad model, norm, batch or cadence.

    References:
      Hoffer, Hubara & Soudry (2017), section 4 (ghost batches of |B_S| examples).
    """
    if config.model.name not in models.MODELS:
        raise ValueError(
            f"unknown model {config.model.name!r}; use one of {sorted(models.MODELS)} "
            f"(--config.model.name=... or the model= option)."
        )
    if config.model.norm not in ("batch", "ghost"):
        raise ValueError(f"model.norm={config.model.norm!r}; use 'batch' or 'ghost'.")
    batch = config.batch_size
    if not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch_size={batch!r} must be a positive integer.")
    if batch % process_count:
        raise ValueError(
            f"batch_size={batch} is not divisible by the {process_count} processes; use a "
            f"multiple of {process_count} (e.g. {_round_up(batch, process_count)})."
        )
    if batch % device_count:
        raise ValueError(
            f"batch_size={batch} is not divisible by the {device_count} devices; use a "
            f"multiple of {device_count} (e.g. batch={_round_up(batch, device_count)})."
        )
    if config.model.norm == "ghost":
        ghost = config.model.ghost_batch_size
        per_device = batch // device_count
        if not isinstance(ghost, int) or ghost <= 0:
            raise ValueError(f"model.ghost_batch_size={ghost!r} must be a positive integer.")
        if per_device % ghost:
            divisors = [g for g in range(1, per_device + 1) if per_device % g == 0]
            nearest = min(divisors, key=lambda g: abs(g - ghost))
            raise ValueError(
                f"the per-device batch {per_device} (batch_size={batch} over {device_count} "
                f"device(s)) is not divisible by the ghost batch size {ghost}: ghost "
                f"batches must not straddle devices or be cut short. Use "
                f"ghost={nearest} (a divisor of {per_device}) or "
                f"batch={_round_up(batch, ghost * device_count)} (a multiple of "
                f"ghost x devices = {ghost * device_count})."
            )
    validation_size = config.get("validation_size", 0)
    if (
        isinstance(validation_size, bool)
        or not isinstance(validation_size, int)
        or (validation_size < 0)
    ):
        raise ValueError(
            f"validation_size={validation_size!r} must be an integer >= 0 (0: no split held "
            f"out; e.g. validation=10000 in the config argument)."
        )
    if config.get("augment", "default") not in input_pipeline.AUGMENTS:
        raise ValueError(f"augment={config.augment!r}; use one of {input_pipeline.AUGMENTS}.")
    if config.log_schedule not in LOG_SCHEDULES:
        raise ValueError(f"log_schedule={config.log_schedule!r}; use one of {LOG_SCHEDULES}.")
    for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[name] <= 0:
            raise ValueError(f"{name}={config[name]} must be positive.")
    for name in ("eval_every_steps", "max_steps"):
        if config.get(name) is not None and config[name] <= 0:
            raise ValueError(f"{name}={config[name]} must be positive (or unset).")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _read_metrics(path: str) -> list[dict]:
    """Reads metrics.jsonl, skipping a last line cut short by a kill."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keeps the records up to ``last_step``, so a resumed run appends where it left."""
    records = [r for r in _read_metrics(path) if r["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains and evaluates one experiment; resumes from workdir/checkpoints if present.

    Args:
      config: an experiment config (``configs/*.py``).
      workdir: output directory (created); rerunning with the same workdir resumes.

    Returns:
      The summary written to workdir/summary.json.

    Raises:
      ValueError: a bad config or a missing dataset, before any compute.
      NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint
        is kept.

    References:
      Hoffer, Hubara & Soudry (2017), sections 3-5.
    """
    start_time = time.time()
    is_main = jax.process_index() == 0

    # ---- Mesh: one "data" axis over the devices of every process. ------------------
    validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    # ---- Data. ------------------------------------------------------------------------
    info = input_pipeline.get_dataset_info(config.dataset, config.data_dir)
    # Optional protocol switches (configs/: protocol=authors): the authors' input,
    # a validation split held out of the training set, the partial last batch kept.
    augment = config.get("augment", "default")
    validation_size = config.get("validation_size", 0) or 0
    keep_last_batch = bool(config.get("keep_last_batch", False))
    regime = regimes.resolve(config, info.num_train - validation_size)
    total_steps = regime.total_steps
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    steps_per_epoch = regime.steps_per_epoch
    eval_every = config.eval_every_steps or max(
        1, round(config.eval_every_epochs * steps_per_epoch)
    )
    eval_batch_size = _round_up(config.eval_batch_size, jax.device_count())
    model = models.get_model(
        config.model.name,
        num_classes=info.num_classes,
        **{k: v for k, v in config.model.to_dict().items() if k != "name"},
    )
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        _write_json(os.path.join(workdir, "config.json"), _config_to_dict(config))
        _write_json(os.path.join(workdir, "regime.json"), regime.to_dict())
        print("regime:", json.dumps(regime.to_dict(), indent=2), flush=True)
    # A partial batch is spread over the ghost batches as the authors' torch.chunk does.
    ghost = config.model.ghost_batch_size if config.model.norm == "ghost" else None
    train_iter = input_pipeline.create_train_iterator(
        config.dataset,
        global_batch_size=config.batch_size,
        seed=config.seed,
        sharding=batch_sharding,
        data_dir=config.data_dir,
        augment=augment,
        validation_size=validation_size,
        keep_last_batch=keep_last_batch,
        batch_groups=config.batch_size // ghost if ghost else 1,
    )
    # Metrics prefix -> split: "eval" is the test split; "val" the held-out validation.
    eval_iters = {
        "eval": input_pipeline.create_eval_iterator(
            config.dataset,
            global_batch_size=eval_batch_size,
            sharding=batch_sharding,
            data_dir=config.data_dir,
            augment=augment,
        )
    }
    if validation_size:
        eval_iters["val"] = input_pipeline.create_eval_iterator(
            config.dataset,
            global_batch_size=eval_batch_size,
            sharding=batch_sharding,
            data_dir=config.data_dir,
            split=input_pipeline.HOLDOUT_SPLIT,
            augment=augment,
            validation_size=validation_size,
        )

    # ---- Model and optimizer: state created on device, replicated. --------------------
    tx = regime.optimizer()
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    init_fn = functools.partial(
        create_train_state, model=model, tx=tx, image_shape=tuple(info.image_shape)
    )
    abstract_state = jax.eval_shape(init_fn, init_rng)
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    if is_main:
        print(f"model {config.model.name}: {num_params} parameters", flush=True)

    # ---- Step functions. ----------------------------------------------------------------
    train_step = make_train_step(model, tx, regime.learning_rate)

    def train_and_accumulate(state, acc, batch):
        # Per-step dropout key from the step number: a resumed run draws the same keys.
        state, metrics = train_step(state, batch, jax.random.fold_in(dropout_rng, state.step))
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        acc = {
            "loss": acc["loss"] + metrics["loss"],
            "accuracy": acc["accuracy"] + metrics["accuracy"],
            "grad_norm": acc["grad_norm"] + metrics["grad_norm"],
            "count": acc["count"] + 1,
            "learning_rate": metrics["learning_rate"],
            "first_bad_step": jnp.where(
                (acc["first_bad_step"] < 0) & ~finite, state.step, acc["first_bad_step"]
            ),
        }
        return state, acc

    def zero_accumulator():
        zero = jnp.zeros((), jnp.float32)
        return {
            "loss": zero,
            "accuracy": zero,
            "grad_norm": zero,
            "count": jnp.zeros((), jnp.int32),
            "learning_rate": zero,
            "first_bad_step": jnp.full((), -1, jnp.int32),
        }

    acc_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(zero_accumulator))
    p_zero_accumulator = jax.jit(zero_accumulator, out_shardings=acc_sharding)
    p_train = jax.jit(
        train_and_accumulate,
        in_shardings=(state_sharding, acc_sharding, batch_sharding),
        out_shardings=(state_sharding, acc_sharding),
        donate_argnums=(0, 1),
        compiler_options=compiler_options(config) or None,
    )
    eval_step = make_eval_step(model)

    def eval_and_accumulate(state, sums, batch):
        return jax.tree.map(jnp.add, sums, eval_step(state, batch))

    p_eval = jax.jit(eval_and_accumulate, donate_argnums=(1,))
    p_weight_distance = jax.jit(lambda s: weight_distance(s.params, s.params0))

    def evaluate(state) -> dict:
        record = {}
        for prefix, eval_iter in eval_iters.items():
            sums = jax.device_put(
                {k: np.zeros((), np.float32) for k in ("loss", "correct", "count")}, replicated
            )
            for batch in eval_iter:
                sums = p_eval(state, sums, batch)
            sums = jax.device_get(sums)
            record[f"{prefix}_loss"] = float(sums["loss"] / sums["count"])
            record[f"{prefix}_accuracy"] = float(sums["correct"] / sums["count"])
        return record

    # ---- Checkpoint restore. --------------------------------------------------------------
    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    checkpoint_dir = str(manager.directory)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    restored = checkpointing.restore_latest(manager, abstract_state, state_sharding)
    if restored is None:
        state = jax.jit(init_fn, out_shardings=state_sharding)(init_rng)
        start_step = 0
    else:
        start_step, state, data_state = restored
        train_iter.set_state(data_state)
        if is_main:
            print(f"resumed from {checkpoint_dir} at step {start_step}", flush=True)
    if is_main:
        _truncate_metrics(metrics_path, start_step)

    # ---- Loop. -----------------------------------------------------------------------------
    log_steps = log_spaced_steps(total_steps) if config.log_schedule == "log" else set()

    def is_log_step(step):
        return step % config.log_every_steps == 0 or step in log_steps or step == total_steps

    def check_finite(acc_host, distance, step):
        bad = int(acc_host["first_bad_step"])
        if bad >= 0 or not math.isfinite(distance):
            where = f"step {bad}" if bad >= 0 else f"the parameters by step {step}"
            kept = manager.latest_step()
            raise NonFiniteLossError(
                f"non-finite training loss at {where} (NaN or inf). "
                + (
                    f"The last good checkpoint (step {kept}) is kept in {checkpoint_dir}. "
                    if kept is not None
                    else "No checkpoint was saved. "
                )
                + "Try a lower learning rate (e.g. --config.regime.lr_scaling=none, or "
                "smaller --config.regime.lr_schedule values), gradient clipping "
                "(--config.regime.grad_clip_norm=5.0), or float32 compute "
                "(--config.model.dtype=float32)."
            )

    writer = None
    bar = None
    if is_main:
        import tensorboardX
        import tqdm

        writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
        bar = tqdm.tqdm(total=total_steps, initial=start_step, mininterval=1.0, smoothing=0.1)
    acc = p_zero_accumulator()
    interval_start, interval_steps = time.time(), 0
    try:
        for step in range(start_step + 1, total_steps + 1):
            state, acc = p_train(state, acc, next(train_iter))
            interval_steps += 1
            if bar is not None:
                bar.update(1)
            record = {}
            if is_log_step(step) or step % config.checkpoint_every_steps == 0:
                acc_host, distance = jax.device_get((acc, p_weight_distance(state)))
                distance = float(distance)
                check_finite(acc_host, distance, step)
            if is_log_step(step):
                elapsed = time.time() - interval_start
                n = int(acc_host["count"])
                record = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "train_loss": float(acc_host["loss"]) / n,
                    "train_accuracy": float(acc_host["accuracy"]) / n,
                    "learning_rate": float(acc_host["learning_rate"]),
                    "grad_norm": float(acc_host["grad_norm"]) / n,
                    "weight_distance": distance,
                    "examples_per_sec": interval_steps * config.batch_size / elapsed,
                }
                acc = p_zero_accumulator()
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{record['train_loss']:.4f}",
                        acc=f"{record['train_accuracy']:.4f}",
                        img_s=f"{record['examples_per_sec']:.0f}",
                        refresh=False,
                    )
            if step % eval_every == 0 or step == total_steps:
                record = {"step": step, "epoch": step / steps_per_epoch, **record}
                record.update(evaluate(state))
            if record and is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(key, value, step)
            if step % config.checkpoint_every_steps == 0 or step == total_steps:
                checkpointing.save(manager, step, state, train_iter.get_state())
            if record:
                # Evaluation and checkpointing do not count against the training rate.
                interval_start, interval_steps = time.time(), 0
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        manager.wait_until_finished()
        manager.close()

    # ---- Summary. ----------------------------------------------------------------------------
    summary = _summarize(metrics_path, config, start_step, total_steps, time.time() - start_time)
    if is_main:
        _write_json(os.path.join(workdir, "summary.json"), summary)
        print("summary:", json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return summary


def _summarize(
    metrics_path: str,
    config: ml_collections.ConfigDict,
    start_step: int,
    total_steps: int,
    wall_time: float,
) -> dict:
    """Final and best evaluation from metrics.jsonl (complete across resumes)."""
    records = _read_metrics(metrics_path) if jax.process_index() == 0 else []
    evals = [r for r in records if "eval_accuracy" in r]
    rates = [r["examples_per_sec"] for r in records if "examples_per_sec" in r]
    # "best" on the test split is the authors' best_prec1 (selected on the test set);
    # with a validation split, the honest pick is the test accuracy at the best val step.
    best = max(evals, key=lambda r: r["eval_accuracy"], default=None)
    vals = [r for r in evals if "val_accuracy" in r]
    best_val = max(vals, key=lambda r: r["val_accuracy"], default=None)
    return {
        "final_eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_accuracy": best["eval_accuracy"] if best else None,
        "best_eval_step": best["step"] if best else None,
        "final_val_accuracy": vals[-1]["val_accuracy"] if vals else None,
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        "best_val_accuracy": best_val["val_accuracy"] if best_val else None,
        "best_val_step": best_val["step"] if best_val else None,
        "eval_accuracy_at_best_val": best_val["eval_accuracy"] if best_val else None,
        "final_train_loss": _last(records, "train_loss"),
        "final_weight_distance": _last(records, "weight_distance"),
        "steps": total_steps,
        "resumed_from_step": start_step,
        "wall_time_sec": wall_time,
        # The first interval includes compilation; the median is the steady rate.
        "examples_per_sec": float(np.median(rates[1:] or rates)) if rates else None,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "process_count": jax.process_count(),
        "config": _config_to_dict(config),
    }


def _last(records: Iterable[dict], key: str) -> Any:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None
