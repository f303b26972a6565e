"""Data-parallel trainer: K steps per dispatch over a 1-D "data" mesh, resumable, multi-host.

``train_and_evaluate(config, workdir)`` runs one column of the paper's table from an
experiment config (``configs/*.py``). It reads top to bottom in sections: mesh -> data
-> model and optimizer -> compiled programs -> checkpoint restore -> loop -> summary.
Its pieces are modules of ``gbn_jax.trainer``: the inputs (``inputs``), the programs
(``programs``, built from ``gbn_jax.trainer.steps``), the state it starts from, restored or
new (``train_state``), when to log, evaluate, save and measure (``cadence``), the records
in flight (``records``) and the outputs (``metric_writer``).

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
  ``cadence.LOOP_SECONDS`` of work, so that a preemption notice is answered within
  seconds. Train metrics are summed on the device. A log or an evaluation is started on
  the device at its step and read one dispatch later, while the next one runs, so
  between checkpoints the devices never wait for the host. K changes no result, bit for
  bit.
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
  skipped. Cost: one more forward and backward pass of one batch per N steps.
* A workdir holds one run (``gbn_jax.trainer.workdir``): a restart whose config differs from the
  run's stops before any compute, unless each change is one that may continue a run
  (``workdir.ALLOWED_CHANGES``) and ``allow_config_change`` is set; those are recorded.
  A checkpoint that cannot be read is moved aside and the one before it restored.
* Outputs in ``workdir`` (docs/workdir.md): config.json (the config that started the
  run), config_changes.jsonl (changes since), regime.json, metrics.jsonl (one JSON
  object per logged step, process 0), tb/ (TensorBoard), checkpoints/ (orbax),
  summary.json.

References:
  Hoffer, Hubara & Soudry (2017): section 3 (||w_t - w_0||, logged as
  ``weight_distance``), sections 4-5 (the regimes resolved by ``gbn_jax.trainer.regimes``).
"""

import functools
import json
import os
import time

import jax
import ml_collections

from gbn_jax import models
from gbn_jax.trainer import (
    checkpointing,
    input_pipeline,
    metric_writer,
    regimes,
    run_files,
    steps,
    train_state,
    validation,
)
from gbn_jax.trainer import inputs as inputs_lib
from gbn_jax.trainer import programs as programs_lib
from gbn_jax.trainer import workdir as workdir_lib
from gbn_jax.trainer.cadence import Cadence, DispatchTimer
from gbn_jax.trainer.records import NonFiniteLossError, RecordQueue, check_finite, start_evaluation

__all__ = ["NonFiniteLossError", "train_and_evaluate"]


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

    # ---- Mesh: one "data" axis over the devices of every process. ------------------------
    validation.validate_config(
        config, device_count=jax.device_count(), process_count=jax.process_count()
    )
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    # ---- Data: on the devices when the splits fit, else streamed from the host. ----------
    info = input_pipeline.get_dataset_info(config.dataset, config.data_dir)
    # Optional protocol switches (configs/: protocol=authors): a validation split held
    # out of the training set, the partial last batch kept.
    regime_examples = info.num_train - (config.get("validation_size", 0) or 0)
    regime = regimes.resolve(config, regime_examples)
    total_steps = regime.total_steps
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    model_kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    model = models.get_model(config.model.name, num_classes=info.num_classes, **model_kwargs)
    # A restart continues the run in workdir only with its config (or allowed changes).
    config_changes = _start_workdir(workdir, config, regime, regime_examples, allow_config_change)
    inputs = inputs_lib.create(config, mesh)
    cadence = Cadence.from_config(
        config,
        total_steps=total_steps,
        steps_per_epoch=regime.steps_per_epoch,
        num_train_examples=regime_examples,
        max_loop_steps=inputs.train_feed.max_steps_per_loop,
        process_count=jax.process_count(),
    )
    if is_main:
        where = "on the devices (replicated)" if inputs.resident else "streamed from the host"
        how = "one loop program" if steps.device_loop(config) else "one program per step"
        print(f"data {where}; up to {cadence.loop_steps} steps per dispatch ({how})", flush=True)

    # ---- Model and optimizer: state created on device, replicated. -----------------------
    tx = regime.optimizer()
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    spec = train_state.spec(model, tx, tuple(info.image_shape), init_rng, mesh)
    if is_main:
        print(f"model {config.model.name}: {spec.num_params} parameters", flush=True)

    # ---- Compiled programs: built here, so that no dispatch waits for a compile. ---------
    programs = programs_lib.build(
        model=model,
        tx=tx,
        learning_rate=regime.learning_rate,
        mesh=mesh,
        state_shapes=spec.state,
        acc_shapes=spec.acc,
        train_feed=inputs.train_feed,
        eval_feeds=inputs.eval_feeds,
        loop_steps=cadence.loop_steps,
        dropout_rng=dropout_rng,
        compiler_options=steps.compiler_options(config),
        device_loop=steps.device_loop(config),
        noise_small_batch=validation.noise_scale_small_batch(
            config, device_count=jax.device_count()
        ),
    )

    # ---- Checkpoint restore: the state, the data position and the train-metric sums. -----
    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    start = train_state.restore_or_create(
        manager, spec, inputs.train_iter, programs.zero_accumulator
    )
    if start.restored and is_main:
        print(f"resumed from {manager.directory} at step {start.step}", flush=True)

    # ---- Loop. ---------------------------------------------------------------------------
    writer = metric_writer.MetricWriter(
        workdir,
        start_step=start.step,
        total_steps=total_steps,
        batch_size=config.batch_size,
        enabled=is_main,
    )
    if is_main:
        workdir_lib.record_changes(workdir, start.step, config_changes)
    # Records started on the devices (a boundary's log and evaluation, a B_simple
    # measurement), read and written one dispatch later.
    records = RecordQueue(writer, steps_per_epoch=regime.steps_per_epoch, checkpoints=manager)
    timer = DispatchTimer(jax.block_until_ready)
    train_feed, state, acc, step = inputs.train_feed, start.state, start.acc, start.step
    saved_step, preempted = step if start.restored else None, False
    try:
        while step < total_steps:
            # -- Dispatch n steps: up to K, none past the next log, eval, checkpoint or
            # noise-scale step, nor past the step a preemption notice (SIGTERM) stops at.
            n, preempted = cadence.next_dispatch(step, timer.seconds_per_step, preemption.stop_step)
            if n == 0:
                break
            xs = train_feed.next_chunk(n, cadence.loop_steps)
            # -- B_simple at a noise step: the state as it is, on the batch of its next
            # update (row 0 of xs); read with the step's record, after this dispatch.
            if cadence.itstime("noise", step):
                records.add_noise(step, programs.noise_scale(state, train_feed.arrays, xs))
            state, acc, done = programs.train_chunk(state, acc, train_feed.arrays, xs, n)
            # -- The dispatch before: wait for it (the host stays one ahead), write its records.
            before_done_at = timer.dispatched(done, n)
            step += n
            writer.advance(n)
            if before_done_at is not None:
                records.flush(before_done_at)

            # -- A boundary: start its log and evaluation on the devices.
            log, evaluate = cadence.itstime("log", step), cadence.itstime("eval", step)
            if log or evaluate:
                train = (acc, programs.weight_distance(state)) if log else None
                evaluation = (
                    start_evaluation(state, programs, inputs.eval_splits) if evaluate else None
                )
                records.start(step, train=train, evaluation=evaluation)
            if log:
                acc = programs.zero_accumulator()

            # -- A checkpoint: written in the background once copied off the devices.
            if cadence.itstime("checkpoint", step):
                records.flush(timer.wait(done))
                with writer.paused():
                    _save_checkpoint(manager, step, state, acc, inputs.train_iter, programs)
                saved_step = step
            if preempted:
                break

        # -- After the loop: the last records, and the checkpoint of a preemption.
        records.flush(timer.wait(state.step))
        if preempted and saved_step != step:
            _save_checkpoint(manager, step, state, acc, inputs.train_iter, programs)
    finally:
        _close(writer, manager)

    # ---- Summary (or, after a preemption notice, where to continue from). ----------------
    if preempted:
        return _preempted(step, manager)
    return _write_summary(
        writer, config, start.step, total_steps, wall_time=time.time() - start_time
    )


def _start_workdir(
    workdir: str,
    config: ml_collections.ConfigDict,
    regime: regimes.ResolvedRegime,
    num_train_examples: int,
    allow_config_change: bool,
) -> dict[str, tuple]:
    """Checks the config against the run in `workdir`, then writes config.json and
    regime.json (process 0); returns the config changes to record.

    Raises:
      workdir.ConfigChangeError: the config differs from the run's, and the change is
        not allowed (or `allow_config_change` is not set).
    """
    changes = workdir_lib.check_restart(
        workdir,
        metric_writer.config_to_dict(config),
        allow_change=allow_config_change,
        fixed=functools.partial(_schedule, num_train_examples=num_train_examples),
    )
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        workdir_lib.write_config(workdir, metric_writer.config_to_dict(config))
        run_files.write_json(run_files.path(workdir, run_files.REGIME_FILE), regime.to_dict())
        print("regime:", json.dumps(regime.to_dict(), indent=2), flush=True)
    return changes


def _save_checkpoint(
    manager: checkpointing.ocp.CheckpointManager,
    step: int,
    state: steps.TrainState,
    acc: dict,
    train_iter: input_pipeline.TrainIterator,
    programs: programs_lib.Programs,
) -> None:
    """Saves a checkpoint of `step` once its loss and weights are known to be finite."""
    acc_host, distance = jax.device_get((acc, programs.weight_distance(state)))
    check_finite(acc_host, float(distance), step, manager)
    checkpointing.save(manager, step, state, train_iter.get_state(), acc)


def _close(
    writer: metric_writer.MetricWriter, manager: checkpointing.ocp.CheckpointManager
) -> None:
    """Closes the writer, then the manager once its background writes are done."""
    writer.close()
    try:
        # A background write that failed raises here (once), naming its step.
        checkpointing.wait_until_finished(manager)
    finally:
        manager.close()


def _preempted(step: int, manager: checkpointing.ocp.CheckpointManager) -> dict:
    """The result of a run stopped by a preemption notice, with `step` saved."""
    if jax.process_index() == 0:
        print(
            f"preemption notice (SIGTERM): saved step {step} in {manager.directory}; "
            "rerun the same command to continue",
            flush=True,
        )
    return {"preempted": True, "step": step, "checkpoint_dir": str(manager.directory)}


def _write_summary(
    writer: metric_writer.MetricWriter,
    config: ml_collections.ConfigDict,
    start_step: int,
    total_steps: int,
    wall_time: float,
) -> dict:
    """Writes summary.json from the run's metrics (process 0) and returns the summary."""
    summary = metric_writer.summarize(
        writer.read(),
        start_step=start_step,
        total_steps=total_steps,
        wall_time=wall_time,
        environment=_environment(),
        config=metric_writer.config_to_dict(config),
    )
    writer.write_json(run_files.SUMMARY_FILE, summary)
    if jax.process_index() == 0:
        print("summary:", json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return summary


def _environment() -> dict:
    """Where the run ran, for its summary."""
    return {
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "process_count": jax.process_count(),
    }


def _schedule(config: dict, num_train_examples: int) -> tuple:
    """The steps at which the learning rate and weight decay change: what a change of
    ``regime.epochs`` within a run must leave as they were."""
    regime = regimes.resolve(config, num_train_examples)
    return regime.lr_boundaries, regime.weight_decay_boundaries
