"""Data-parallel trainer: K steps per dispatch over a 1-D "data" mesh, resumable, multi-host.

``train_and_evaluate(config, workdir)`` runs one column of the paper's table from an
experiment config (``configs/*.py``). Sections, in order: mesh -> data -> model and
optimizer -> step functions -> checkpoint restore -> loop -> summary. The state and the
jitted programs are built in ``gbn_jax.steps``, the device-side data in
``gbn_jax.data.feed``.

* Parameters, batch statistics and optimizer state are replicated; every batch is
  sharded over the "data" axis. GSPMD inserts the gradient all-reduce; ghost batch
  norm needs none when each device holds whole ghost batches.
* Datasets that fit (the MNIST family, CIFAR) live on the devices as uint8, replicated;
  each step gathers its batch there from the epoch's permutation and augments it there.
  Streamed datasets (ImageNet) are read on the host one dispatch ahead of the devices.
* One dispatch runs up to K = ``config.steps_per_loop`` steps, cut short at the steps
  where the host must look: logs, evaluations, checkpoints. On accelerators the K steps
  are one program (a loop on the device); on the CPU (``config.device_loop``, unset: off
  there only) each step is its own program, dispatched back to back over the same
  device-resident data, since XLA:CPU runs convolutions slowly in a loop body. Unset, K
  is the shortest of those cadences, and on one process a dispatch is also kept to about
  ``LOOP_SECONDS`` of work, so that a preemption notice is answered within seconds.
  Train metrics are summed on the device. A log or an evaluation is started on the
  device at its step and read one dispatch later, while the next one runs, so between
  checkpoints the devices never wait for the host. K changes no result, bit for bit.
* Resumption is exact: the checkpoint holds the train state (with the step-0
  parameters for the weight distance), the data position and the train-metric sums
  since the last log; dropout keys are ``fold_in(key, step)``. metrics.jsonl is cut
  back to the restored step (the TensorBoard files are not: a resumed run starts a new
  event file). Checkpoints are written in the background (orbax async).
* Preemption: on SIGTERM the run saves a checkpoint at the step it has reached (every
  process at the same step) and returns; rerunning the command continues from there
  and ends exactly as an uninterrupted run.
* Gradient noise scale (``config.noise_scale.every_steps = N``, off by default): at
  every N-th step (a cadence the dispatches are cut at, like logs) a separate program,
  `steps.make_noise_scale_measurement`, takes the gradient of the next step's batch in
  shards of b examples and logs |G_small|^2, |G_big|^2, |G|^2, tr(Sigma) and B_simple
  (``noise_*`` fields, a record of their own unless the step logs anyway). It reads the
  state and writes nothing back: the training is the same bit for bit with it or without.
  A measurement whose batch would be an epoch's padded last batch (keep_last_batch) is
  skipped. Cost: one more forward and backward pass of one batch per N steps, ~1/N of the time.
* A workdir holds one run (``gbn_jax.workdir``): a restart whose config differs from the
  run's stops before any compute, unless each change is one that may continue a run
  (``workdir.ALLOWED_CHANGES``) and ``allow_config_change`` is set; those are recorded.
  A checkpoint that cannot be read is moved aside and the one before it restored.
* Outputs in ``workdir`` (docs/workdir.md): config.json (the config that started the
  run), config_changes.jsonl (changes since), regime.json, metrics.jsonl (one JSON
  object per logged step, process 0), tb/ (TensorBoard), checkpoints/ (orbax),
  summary.json.

References:
  Hoffer, Hubara & Soudry (2017): section 3 (||w_t - w_0||, logged as
  ``weight_distance``), sections 4-5 (the regimes resolved by ``gbn_jax.regimes``).
"""

import functools
import json
import math
import os
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gbn_jax import checkpointing, input_pipeline, models, regimes, steps
from gbn_jax import workdir as workdir_lib
from gbn_jax.data import feed

# Re-exported: the pieces benchmarks and tests build steps from (gbn_jax/steps.py).
from gbn_jax.steps import (
    XLA_CPU_FAST_OPTIONS,
    TrainState,
    compiler_options,
    create_train_state,
    make_eval_step,
    make_train_step,
    weight_distance,
)

__all__ = [
    "LOG_SCHEDULES",
    "LOOP_SECONDS",
    "NOISE_SCALE_FIELD",
    "WALL_CLOCK_FIELDS",
    "XLA_CPU_FAST_OPTIONS",
    "NonFiniteLossError",
    "TrainState",
    "compiler_options",
    "create_train_state",
    "log_spaced_steps",
    "make_eval_step",
    "make_train_step",
    "noise_scale_small_batch",
    "steps_per_loop",
    "train_and_evaluate",
    "validate_config",
    "weight_distance",
]

LOG_SCHEDULES = ("linear", "log")
# Fields of a metrics.jsonl record that measure the machine, not the training.
WALL_CLOCK_FIELDS = ("examples_per_sec",)
# A record holds a B_simple measurement when it has this field (config.noise_scale).
NOISE_SCALE_FIELD = "noise_b_simple"
# With steps_per_loop unset, one process keeps a dispatch to about this much work: the
# host then answers a SIGTERM within ~2 LOOP_SECONDS plus a save, even where a step
# takes seconds (ResNets on a CPU), and dispatch costs stay far below 1%.
LOOP_SECONDS = 1.0


class NonFiniteLossError(FloatingPointError):
    """The training loss or the parameters became NaN or infinite."""


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
    for name in ("eval_every_steps", "max_steps", "steps_per_loop"):
        if config.get(name) is not None and config[name] <= 0:
            raise ValueError(f"{name}={config[name]} must be positive (or unset).")
    noise_scale_small_batch(config, device_count=device_count)


def noise_scale_small_batch(config: ml_collections.ConfigDict, *, device_count: int) -> int | None:
    """b, the small batch of the B_simple measurement, or None when it is off.

    ``config.noise_scale.small_batch_size``, or unset: the regime's |B_S|
    (``regime.reference_batch_size``), or B / 4 when the batch is |B_S| or smaller
    (the small-batch column has no smaller regime batch to shard into).

    Args:
      config: the experiment config; ``noise_scale.every_steps`` unset turns it off.
      device_count: devices of all processes.

    Returns:
      b, or None.

    Raises:
      ValueError: a cadence that is not positive, or a b that does not give at least
        two whole shards per batch on every device, or that ghost batches do not divide.

    References:
      McCandlish et al. (2018), appendix A.1 (two batch sizes, b < B).
    """
    settings = config.get("noise_scale") or {}
    every = settings.get("every_steps")
    if every is None:
        return None
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise ValueError(
            f"noise_scale.every_steps={every!r} must be a positive number of steps between "
            "B_simple measurements (e.g. noise_scale_every=25 in the config argument); "
            "unset it to measure nothing."
        )
    batch = config.batch_size
    small = settings.get("small_batch_size")
    if small is None:
        reference = config.regime.get("reference_batch_size") or batch
        small = reference if reference < batch else batch // 4
    per_device = batch // device_count
    fix = "set --config.noise_scale.small_batch_size to a divisor of"
    if isinstance(small, bool) or not isinstance(small, int) or small <= 0:
        raise ValueError(f"noise_scale.small_batch_size={small!r} must be a positive integer.")
    if small >= batch or batch % small:
        raise ValueError(
            f"noise_scale.small_batch_size={small} must divide batch_size={batch} at least "
            f"twice: B_simple needs two batch sizes b < B. {fix} {batch} below it "
            f"(e.g. {batch // 4 or 1})."
        )
    if per_device % small:
        raise ValueError(
            f"noise_scale.small_batch_size={small} does not divide the per-device batch "
            f"{per_device} (batch_size={batch} over {device_count} devices): each shard of b "
            f"examples must lie on one device. {fix} {per_device}."
        )
    ghost = config.model.ghost_batch_size if config.model.norm == "ghost" else None
    if ghost and small % ghost:
        raise ValueError(
            f"noise_scale.small_batch_size={small} is not a multiple of the ghost batch size "
            f"{ghost}: a shard of b examples must hold whole ghost batches, as the step "
            f"normalizes them. {fix.replace('a divisor of', 'a multiple of')} {ghost}."
        )
    return small


def steps_per_loop(config: ml_collections.ConfigDict, *, eval_every: int, total_steps: int) -> int:
    """K, the most steps one dispatch runs: ``config.steps_per_loop``, or (unset) the
    shortest of the log, eval, checkpoint and noise-scale cadences, so that most
    dispatches run all K steps (the loop cuts a dispatch at each of those steps)."""
    noise_every = (config.get("noise_scale") or {}).get("every_steps")
    return config.get("steps_per_loop") or min(
        config.log_every_steps,
        eval_every,
        config.checkpoint_every_steps,
        noise_every or total_steps,
        total_steps,
    )


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
    """Keeps the records up to ``last_step``, so a resumed run appends where it left.

    A noise-scale record of ``last_step`` itself goes too: it was measured after the
    checkpoint, on the next step's batch, and the resumed run measures it again.
    """
    records = [
        r
        for r in _read_metrics(path)
        if r["step"] < last_step or (r["step"] == last_step and NOISE_SCALE_FIELD not in r)
    ]
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


def _schedule(config: dict, num_train_examples: int) -> tuple:
    """The steps at which the learning rate and weight decay change: what a change of
    ``regime.epochs`` within a run must leave as they were."""
    regime = regimes.resolve(config, num_train_examples)
    return regime.lr_boundaries, regime.weight_decay_boundaries


class _TrainingRate:
    """Examples per second between two logs, evaluations and checkpoint saves left out.

    Times are when the host saw a dispatch finish; the devices run the next dispatch
    meanwhile, so a log costs no device time and the rate is the devices' own.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.steps = 0
        self.restart(time.time())

    def restart(self, now: float) -> None:
        """Starts the next interval's clock (its steps count from its log's snapshot)."""
        self.start, self.paused = now, 0.0

    def pause(self, since: float, until: float) -> None:
        """Leaves [since, until] out (clipped to this interval)."""
        self.paused += max(0.0, until - max(since, self.start))

    def examples_per_sec(self, steps: int, until: float) -> float:
        return steps * self.batch_size / max(until - self.start - self.paused, 1e-9)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict:
    """Trains and evaluates one experiment; resumes from workdir/checkpoints if present.

    Args:
      config: an experiment config (``configs/*.py``).
      workdir: output directory (created); rerunning with the same workdir resumes.
      allow_config_change: continue the run in ``workdir`` with a config that differs
        from its own in fields of ``workdir.ALLOWED_CHANGES`` only (recorded in
        workdir/config_changes.jsonl).

    Returns:
      The summary written to workdir/summary.json; after a preemption notice (SIGTERM),
      ``{"preempted": True, "step": ..., "checkpoint_dir": ...}`` instead (no summary
      is written: rerun to finish).

    Raises:
      ValueError: a bad config, a missing dataset, or a config that differs from the
        run's in ``workdir`` (``workdir.ConfigChangeError``), before any compute.
      NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint
        is kept.
      checkpointing.CheckpointError: a checkpoint could not be written (the ones
        before are intact), or none of the run's checkpoints can be read.

    References:
      Hoffer, Hubara & Soudry (2017), sections 3-5.
    """
    # Watching for SIGTERM from the start: a notice during compilation stops the run at
    # its first step with that step saved.
    with checkpointing.PreemptionWatch() as preemption:
        return _train_and_evaluate(config, workdir, preemption, allow_config_change)


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    preemption: checkpointing.PreemptionWatch,
    allow_config_change: bool,
) -> dict:
    start_time = time.time()
    is_main = jax.process_index() == 0

    # ---- Mesh: one "data" axis over the devices of every process. ------------------
    validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    # ---- Data: on the devices when the splits fit, else streamed from the host. --------
    info = input_pipeline.get_dataset_info(config.dataset, config.data_dir)
    # Optional protocol switches (configs/: protocol=authors): the authors' input,
    # a validation split held out of the training set, the partial last batch kept.
    augment = config.get("augment", "default")
    validation_size = config.get("validation_size", 0) or 0
    keep_last_batch = bool(config.get("keep_last_batch", False))
    regime_examples = info.num_train - validation_size
    regime = regimes.resolve(config, regime_examples)
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
    # A restart continues the run in workdir only with its config (or allowed changes).
    config_changes = workdir_lib.check_restart(
        workdir,
        _config_to_dict(config),
        allow_change=allow_config_change,
        fixed=functools.partial(_schedule, num_train_examples=regime_examples),
    )
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        workdir_lib.write_config(workdir, _config_to_dict(config))
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
    resident = _device_resident(config, train_iter, list(eval_iters.values()))
    train_feed = feed.TrainFeed(train_iter, mesh, resident=resident)
    eval_feeds = {name: feed.EvalFeed(it, mesh) for name, it in eval_iters.items() if resident}
    loop_steps = steps_per_loop(config, eval_every=eval_every, total_steps=total_steps)
    loop_steps = min(loop_steps, train_feed.max_steps_per_loop or loop_steps)
    # Dispatches kept to ~LOOP_SECONDS; one process only (processes must dispatch alike).
    timed_loops = config.get("steps_per_loop") is None and jax.process_count() == 1
    if is_main:
        where = "on the devices (replicated)" if resident else "streamed from the host"
        how = "one loop program" if steps.device_loop(config) else "one program per step"
        print(f"data {where}; up to {loop_steps} steps per dispatch ({how})", flush=True)

    # ---- Model and optimizer: state created on device, replicated. --------------------
    tx = regime.optimizer()
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    init_fn = functools.partial(
        create_train_state, model=model, tx=tx, image_shape=tuple(info.image_shape)
    )
    abstract_state = jax.eval_shape(init_fn, init_rng)
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
    abstract_acc = jax.eval_shape(steps.zero_metrics)
    acc_sharding = jax.tree.map(lambda _: replicated, abstract_acc)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    if is_main:
        print(f"model {config.model.name}: {num_params} parameters", flush=True)

    # ---- Step functions: compiled here, so that no dispatch waits for a compile. --------
    train_loop = steps.make_train_loop(
        make_train_step(model, tx, regime.learning_rate), train_feed.batch, dropout_rng
    )
    state_shapes = _with_shardings(abstract_state, state_sharding)
    acc_shapes = _with_shardings(abstract_acc, acc_sharding)
    # A chunk's first n rows: on accelerators one program (a fori_loop for any n <= K,
    # or all K rows in a scan, whose static trip count spares a host round trip per
    # step); on the CPU (device_loop off) n programs of one step, since XLA:CPU runs
    # convolutions in a loop body in a slow layout (steps.device_loop).
    run_chunk = steps.compile_train_loop(
        train_loop,
        state_shapes,
        acc_shapes,
        train_feed.arrays,
        train_feed.chunk_shapes(loop_steps),
        compiler_options=compiler_options(config),
        device_loop=steps.device_loop(config),
        scan=jax.default_backend() != "cpu",
    )
    p_zero_accumulator = jax.jit(steps.zero_metrics, out_shardings=acc_sharding)
    p_weight_distance = (
        jax.jit(lambda s: weight_distance(s.params, s.params0)).lower(state_shapes).compile()
    )
    eval_step = make_eval_step(model)
    p_eval_pass = {
        name: jax.jit(steps.make_eval_pass(eval_step, f.batch))
        .lower(state_shapes, f.arrays, f.xs)
        .compile()
        for name, f in eval_feeds.items()
    }
    p_eval_batch = jax.jit(
        lambda state, sums, batch: jax.tree.map(jnp.add, sums, eval_step(state, batch)),
        donate_argnums=(1,),
    )
    # B_simple every noise_every steps (config.noise_scale; off: None): its own program,
    # reading the state and the next dispatch's chunk, so the training is unchanged.
    noise_every = (config.get("noise_scale") or {}).get("every_steps")
    p_noise_scale = None
    if noise_every:
        measure = steps.make_noise_scale_measurement(
            model,
            train_feed.batch,
            dropout_rng,
            mesh,
            small_batch_size=noise_scale_small_batch(config, device_count=jax.device_count()),
            # Micro-batches side by side on accelerators, one after another on the CPU.
            vectorize=jax.default_backend() != "cpu",
        )
        p_noise_scale = (
            jax.jit(measure, out_shardings=replicated, compiler_options=compiler_options(config))
            .lower(state_shapes, train_feed.arrays, train_feed.chunk_shapes(loop_steps))
            .compile()
        )

    def start_evaluation(state) -> dict:
        """Dispatches every split's evaluation; returns the device-side sums."""
        sums = {}
        for name, it in eval_iters.items():
            if name in eval_feeds:
                sums[name] = p_eval_pass[name](state, eval_feeds[name].arrays, eval_feeds[name].xs)
                continue
            split_sums = jax.device_put(
                {k: np.zeros((), np.float32) for k in ("loss", "correct", "count")}, replicated
            )
            for batch in it:
                split_sums = p_eval_batch(state, split_sums, batch)
            sums[name] = split_sums
        return sums

    def finish_evaluation(sums) -> dict:
        record = {}
        for name, split_sums in jax.device_get(sums).items():
            record[f"{name}_loss"] = float(split_sums["loss"] / split_sums["count"])
            record[f"{name}_accuracy"] = float(split_sums["correct"] / split_sums["count"])
        return record

    # ---- Checkpoint restore. --------------------------------------------------------------
    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    checkpoint_dir = str(manager.directory)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    summary_path = os.path.join(workdir, "summary.json")
    restored = checkpointing.restore_latest(
        manager, abstract_state, state_sharding, abstract_acc, acc_sharding
    )
    acc = None
    if restored is None:
        state = jax.jit(init_fn, out_shardings=state_sharding)(init_rng)
        start_step, saved_step = 0, None
    else:
        start_step, state, data_state, acc = restored
        saved_step = start_step
        train_iter.set_state(data_state)
        if is_main:
            print(f"resumed from {checkpoint_dir} at step {start_step}", flush=True)
    if acc is None:
        acc = p_zero_accumulator()
    if is_main:
        _truncate_metrics(metrics_path, start_step)
        workdir_lib.record_changes(workdir, start_step, config_changes)
        if start_step < total_steps and os.path.exists(summary_path):
            # A summary is a finished run's; this one trains on (from an older checkpoint
            # than the last, or to more steps), so it goes until the run ends again.
            os.remove(summary_path)

    # ---- Loop. -----------------------------------------------------------------------------
    log_steps = log_spaced_steps(total_steps) if config.log_schedule == "log" else set()

    def is_log_step(step):
        return step % config.log_every_steps == 0 or step in log_steps or step == total_steps

    def is_eval_step(step):
        return step % eval_every == 0 or step == total_steps

    def is_checkpoint_step(step):
        return step % config.checkpoint_every_steps == 0 or step == total_steps

    # With the partial batch kept, update k * steps_per_epoch trains on a padded batch
    # of fewer than B examples: a B_simple there would mix two batch sizes, so the
    # measurement due at the step before it is skipped.
    padded_last_batch = keep_last_batch and regime_examples % config.batch_size != 0

    def is_noise_step(step):
        if p_noise_scale is None or step % noise_every:
            return False
        return not (padded_last_batch and step % steps_per_epoch == steps_per_epoch - 1)

    def chunk_length(step, seconds_per_step):
        """Steps of the next dispatch: at most K, and none past the next boundary."""
        limit = min(loop_steps, total_steps - step)
        if timed_loops:  # One step until a dispatch has been timed.
            limit = min(limit, max(1, int(LOOP_SECONDS / (seconds_per_step or LOOP_SECONDS))))
        for n in range(1, limit):
            s = step + n
            if is_log_step(s) or is_eval_step(s) or is_checkpoint_step(s) or is_noise_step(s):
                return n
        return limit

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
    rate = _TrainingRate(config.batch_size)

    def start_record(step, state, acc) -> dict:
        """A boundary's log and evaluation, started on the devices (read in write_record)."""
        pending = {"step": step}
        if is_log_step(step):
            pending["train"] = (acc, p_weight_distance(state))
            pending["steps"], rate.steps = rate.steps, 0
        if is_eval_step(step):
            pending["eval"] = start_evaluation(state)
        return pending

    def write_record(pending, done_at) -> None:
        """Reads a started record (``done_at``: when its dispatch finished) and logs it."""
        step, record = pending["step"], {}
        if "train" in pending:
            acc_host, distance = jax.device_get(pending["train"])
            check_finite(acc_host, float(distance), step)
            n = int(acc_host["count"])
            record = {
                "step": step,
                "epoch": step / steps_per_epoch,
                "train_loss": float(acc_host["loss"]) / n,
                "train_accuracy": float(acc_host["accuracy"]) / n,
                "learning_rate": float(acc_host["learning_rate"]),
                "grad_norm": float(acc_host["grad_norm"]) / n,
                "weight_distance": float(distance),
                "examples_per_sec": rate.examples_per_sec(pending["steps"], done_at),
            }
        if "eval" in pending:
            record = {"step": step, "epoch": step / steps_per_epoch, **record}
            record.update(finish_evaluation(pending["eval"]))
        if "noise" in pending:
            record = {"step": step, "epoch": step / steps_per_epoch, **record}
            record.update({k: float(v) for k, v in jax.device_get(pending["noise"]).items()})
        # The devices moved on to the next dispatch when this record's work was done.
        if "train" in pending:
            rate.restart(time.time() if "eval" in pending else done_at)
        else:
            rate.pause(done_at, time.time())
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(key, value, step)
            if "train_loss" in record:
                bar.set_postfix(
                    loss=f"{record['train_loss']:.4f}",
                    acc=f"{record['train_accuracy']:.4f}",
                    img_s=f"{record['examples_per_sec']:.0f}",
                    refresh=False,
                )

    def save_checkpoint(step, state, acc) -> None:
        acc_host, distance = jax.device_get((acc, p_weight_distance(state)))
        check_finite(acc_host, float(distance), step)
        checkpointing.save(manager, step, state, train_iter.get_state(), acc)

    def wait(done) -> float:
        jax.block_until_ready(done)
        return time.time()

    step, preempted = start_step, False
    # Records started on the devices (a boundary's log and evaluation, a B_simple
    # measurement), read and written one dispatch later.
    started: list[dict] = []
    previous = None  # (step marker, steps, dispatch time) of the dispatch before
    seconds_per_step, last_done_at = None, time.time()
    try:
        while step < total_steps:
            # -- Dispatch n steps: up to K, none past the next log, eval, checkpoint or
            # noise-scale step, nor past the step a preemption notice (SIGTERM) stops at.
            n = chunk_length(step, seconds_per_step)
            stop = preemption.stop_step(step, n)
            if stop == step:
                preempted = True
                break
            if stop is not None:
                n, preempted = stop - step, True
            xs = train_feed.next_chunk(n, loop_steps)
            # -- B_simple at a noise step: the state as it is, on the batch of its next
            # update (row 0 of xs); read with the step's record, after this dispatch.
            if is_noise_step(step):
                if not (started and started[-1]["step"] == step):
                    started.append({"step": step})
                started[-1]["noise"] = p_noise_scale(state, train_feed.arrays, xs)
            state, acc, done = run_chunk(state, acc, train_feed.arrays, xs, n)
            dispatched_at = time.time()
            step += n
            rate.steps += n
            if bar is not None:
                bar.update(n)

            # -- The dispatch before: wait for it (the host stays one ahead), write its record.
            if previous is not None:
                done_at = wait(previous[0])
                seconds_per_step = (done_at - max(previous[2], last_done_at)) / previous[1]
                last_done_at = done_at
                for pending in started:
                    write_record(pending, done_at)
                started = []
            previous = (done, n, dispatched_at)

            # -- A boundary: start its log and evaluation on the devices.
            if is_log_step(step) or is_eval_step(step):
                started.append(start_record(step, state, acc))
                if "train" in started[-1]:
                    acc = p_zero_accumulator()

            # -- A checkpoint: written in the background once copied off the devices.
            if is_checkpoint_step(step):
                done_at = last_done_at = wait(done)
                previous = None
                for pending in started:
                    write_record(pending, done_at)
                started = []
                paused_at = time.time()
                save_checkpoint(step, state, acc)
                saved_step = step
                rate.pause(paused_at, time.time())
            if preempted:
                break

        # -- After the loop: the last record, and the checkpoint of a preemption.
        done_at = wait(state.step)
        for pending in started:
            write_record(pending, done_at)
        if preempted and saved_step != step:
            save_checkpoint(step, state, acc)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        try:
            # A background write that failed raises here (once), naming its step.
            checkpointing.wait_until_finished(manager)
        finally:
            manager.close()
    if preempted:
        if is_main:
            print(
                f"preemption notice (SIGTERM): saved step {step} in {checkpoint_dir}; "
                "rerun the same command to continue",
                flush=True,
            )
        return {"preempted": True, "step": step, "checkpoint_dir": checkpoint_dir}

    # ---- Summary. ----------------------------------------------------------------------------
    summary = _summarize(metrics_path, config, start_step, total_steps, time.time() - start_time)
    if is_main:
        _write_json(summary_path, summary)
        print("summary:", json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return summary


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings, to lower a program before its inputs exist."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def _device_resident(
    config: ml_collections.ConfigDict,
    train_iter: input_pipeline.TrainIterator,
    eval_iters: list[input_pipeline.EvalIterator],
) -> bool:
    """``config.device_resident_data``, or (unset) whether the splits fit on a device."""
    setting = config.get("device_resident_data")
    if setting is not None:
        return bool(setting)
    iterators = [train_iter, *eval_iters]
    if any(it.host_arrays is None for it in iterators):
        return False
    need = sum(feed.split_bytes(it) for it in iterators)
    return need <= feed.resident_budget(jax.local_devices())


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
