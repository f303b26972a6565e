"""A step's record: started on the devices at its step, read and written one dispatch later.

At a log step the train-metric sums and the weight distance, at an evaluation step every
split's evaluation, and at a noise step the B_simple measurement are dispatched to the
devices (`start_evaluation`, ``RecordQueue.start``, ``RecordQueue.add_noise``) while the
next dispatch runs; ``RecordQueue.flush`` reads them once the host has waited for that
dispatch, checks the loss is finite, and writes the records. The devices never wait for
the host between checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from gbn_jax.trainer.data import feed, iterators
from gbn_jax.trainer.metric_writer import MetricWriter
from gbn_jax.trainer.programs import Programs
from gbn_jax.trainer.steps import TrainState


class NonFiniteLossError(FloatingPointError):
    """The training loss or the parameters became NaN or infinite."""


def check_finite(
    acc_host: dict[str, Any],
    distance: float,
    step: int,
    checkpoints: Any,
) -> None:
    """Raises if a step since the last log had a non-finite loss, or the weights did.

    Args:
      acc_host: the train-metric sums, on the host (``first_bad_step`` -1: none).
      distance: ||w_t - w_0|| at `step`.
      step: the step reached.
      checkpoints: the run's checkpoint manager (``latest_step()``, ``directory``): the
        message names the last good checkpoint.

    Raises:
      NonFiniteLossError: with what to try next.
    """
    bad = int(acc_host["first_bad_step"])
    if bad < 0 and math.isfinite(distance):
        return
    where = f"step {bad}" if bad >= 0 else f"the parameters by step {step}"
    kept = checkpoints.latest_step()
    raise NonFiniteLossError(
        f"non-finite training loss at {where} (NaN or inf). "
        + (
            f"The last good checkpoint (step {kept}) is kept in {checkpoints.directory}. "
            if kept is not None
            else "No checkpoint was saved. "
        )
        + "Try a lower learning rate (e.g. --config.regime.lr_scaling=none, or "
        "smaller --config.regime.lr_schedule values), gradient clipping "
        "(--config.regime.grad_clip_norm=5.0), or float32 compute "
        "(--config.model.dtype=float32)."
    )


def start_evaluation(
    state: TrainState,
    programs: Programs,
    splits: dict[str, feed.EvalFeed | iterators.EvalIterator],
) -> dict[str, dict[str, jax.Array]]:
    """Dispatches every split's evaluation; returns the device-side sums by split.

    Args:
      state: the state to evaluate.
      programs: the compiled programs.
      splits: metrics prefix -> the split on the devices (`feed.EvalFeed`, one
        program) or on the host (an `EvalIterator`, one program per batch).
    """
    sums = {}
    for name, split in splits.items():
        if isinstance(split, feed.EvalFeed):
            sums[name] = programs.eval_pass[name](state, split.arrays, split.xs)
            continue
        split_sums = programs.zero_eval_sums()
        for batch in split:
            split_sums = programs.eval_batch(state, split_sums, batch)
        sums[name] = split_sums
    return sums


def finish_evaluation(sums: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{split}_loss`` and ``{split}_accuracy`` from the sums of `start_evaluation`."""
    record = {}
    for name, split_sums in jax.device_get(sums).items():
        record[f"{name}_loss"] = float(split_sums["loss"] / split_sums["count"])
        record[f"{name}_accuracy"] = float(split_sums["correct"] / split_sums["count"])
    return record


@dataclasses.dataclass
class Started:
    """A step's record in flight: device values not read yet.

    Attributes:
      step: the step.
      train: (train-metric sums, weight distance) at a log step.
      steps: the steps the train metrics sum over (for the rate).
      evaluation: `start_evaluation`'s sums at an evaluation step.
      noise: the B_simple measurement at a noise step.
    """

    step: int
    train: tuple[dict, jax.Array] | None = None
    steps: int = 0
    evaluation: dict | None = None
    noise: dict | None = None


class RecordQueue:
    """The records started on the devices, written by `flush` once their work is done.

    Args:
      writer: where records go (it also keeps the training rate).
      steps_per_epoch: updates per epoch (a record's ``epoch``).
      checkpoints: the checkpoint manager, named by a non-finite-loss error.
    """

    def __init__(self, writer: MetricWriter, *, steps_per_epoch: int, checkpoints: Any) -> None:
        self.writer = writer
        self.steps_per_epoch = steps_per_epoch
        self.checkpoints = checkpoints
        self.started: list[Started] = []

    def start(
        self,
        step: int,
        *,
        train: tuple[dict, jax.Array] | None = None,
        evaluation: dict | None = None,
    ) -> None:
        """Queues a boundary's log (`train`) and evaluation, already dispatched."""
        steps = self.writer.rate.take_steps() if train is not None else 0
        self.started.append(Started(step, train=train, steps=steps, evaluation=evaluation))

    def add_noise(self, step: int, noise: dict) -> None:
        """Queues a B_simple measurement, in the record of its step if one is queued."""
        if not (self.started and self.started[-1].step == step):
            self.started.append(Started(step))
        self.started[-1].noise = noise

    def flush(self, done_at: float) -> None:
        """Reads and writes every queued record; `done_at`: when their dispatch finished."""
        for started in self.started:
            self._write(started, done_at)
        self.started = []

    def _write(self, started: Started, done_at: float) -> None:
        step, record, rate = started.step, {}, self.writer.rate
        head = {"step": step, "epoch": step / self.steps_per_epoch}
        if started.train is not None:
            acc_host, distance = jax.device_get(started.train)
            check_finite(acc_host, float(distance), step, self.checkpoints)
            n = int(acc_host["count"])
            record = {
                **head,
                "train_loss": float(acc_host["loss"]) / n,
                "train_accuracy": float(acc_host["accuracy"]) / n,
                "learning_rate": float(acc_host["learning_rate"]),
                "grad_norm": float(acc_host["grad_norm"]) / n,
                "weight_distance": float(distance),
                "examples_per_sec": rate.examples_per_sec(started.steps, done_at),
            }
        if started.evaluation is not None:
            record = {**head, **record, **finish_evaluation(started.evaluation)}
        if started.noise is not None:
            noise = jax.device_get(started.noise)
            record = {**head, **record, **{k: float(v) for k, v in noise.items()}}
        # The devices moved on to the next dispatch when this record's work was done;
        # reading an evaluation kept the host, not the devices, busy.
        if started.train is not None:
            rate.restart(rate.clock() if started.evaluation is not None else done_at)
        else:
            rate.pause(done_at, rate.clock())
        self.writer.write(step, record)
