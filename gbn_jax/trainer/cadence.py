"""When the trainer's host looks at the devices, and how long each dispatch runs.

`Cadence` answers "is it time to log / evaluate / checkpoint / measure B_simple at step
s" (``itstime``, as big_vision's ``utils.itstime``) and "how many steps does the next
dispatch run" (``next_dispatch``): up to K = `steps_per_loop`, cut at the next step
where the host must look, kept to about `LOOP_SECONDS` of work on one process, and
stopped where a preemption notice says. `DispatchTimer` measures the seconds per step
that this last rule needs.

References:
  Hoffer, Hubara & Soudry (2017), section 3 (||w_t - w_0|| ~ log t: the log-spaced
  logging schedule).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Literal

import ml_collections

LOG_SCHEDULES = ("linear", "log")
# With steps_per_loop unset, one process keeps a dispatch to about this much work: the
# host then answers a SIGTERM within ~2 LOOP_SECONDS plus a save, even where a step
# takes seconds (ResNets on a CPU), and dispatch costs stay far below 1%.
LOOP_SECONDS = 1.0

Event = Literal["log", "eval", "checkpoint", "noise"]


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


def eval_every_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """``config.eval_every_steps``, or (unset) ``eval_every_epochs`` in steps (at least 1)."""
    return config.eval_every_steps or max(1, round(config.eval_every_epochs * steps_per_epoch))


def steps_per_loop(config: ml_collections.ConfigDict, *, eval_every: int, total_steps: int) -> int:
    """K, the most steps one dispatch runs.

    ``config.steps_per_loop``, or (unset) the shortest of the log, eval, checkpoint and
    noise-scale cadences, so that most dispatches run all K steps (a dispatch is cut at
    each of those steps).

    Args:
      config: the experiment config.
      eval_every: steps between evaluations (`eval_every_steps`).
      total_steps: the run's last step.

    Returns:
      K.
    """
    noise_every = (config.get("noise_scale") or {}).get("every_steps")
    return config.get("steps_per_loop") or min(
        config.log_every_steps,
        eval_every,
        config.checkpoint_every_steps,
        noise_every or total_steps,
        total_steps,
    )


@dataclasses.dataclass(frozen=True)
class Cadence:
    """The steps at which the host logs, evaluates, checkpoints and measures B_simple.

    Attributes:
      total_steps: the run's last step (always logged, evaluated and checkpointed).
      log_every: steps between train-metric logs.
      eval_every: steps between evaluations.
      checkpoint_every: steps between checkpoints.
      loop_steps: K, the most steps of one dispatch.
      log_spaced: further steps to log at (the ``log`` schedule; empty for ``linear``).
      noise_every: steps between B_simple measurements (None: never).
      steps_per_epoch: updates per epoch.
      padded_last_batch: whether update k * steps_per_epoch trains on a padded batch
        of fewer than B examples (the partial batch kept).
      timed: keep a dispatch to about `LOOP_SECONDS` of work (one process only:
        processes must dispatch alike, and their timings differ).
    """

    total_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    loop_steps: int
    log_spaced: frozenset[int] = frozenset()
    noise_every: int | None = None
    steps_per_epoch: int = 1
    padded_last_batch: bool = False
    timed: bool = False

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict,
        *,
        total_steps: int,
        steps_per_epoch: int,
        num_train_examples: int,
        max_loop_steps: int | None = None,
        process_count: int = 1,
    ) -> Cadence:
        """The cadence of an experiment config.

        Args:
          config: the experiment config (its cadences, ``log_schedule``,
            ``steps_per_loop`` and ``noise_scale.every_steps``).
          total_steps: the run's last step.
          steps_per_epoch: updates per epoch.
          num_train_examples: the examples an epoch trains on (with
            ``keep_last_batch``, a remainder of them makes a padded last batch).
          max_loop_steps: a cap on K from the input (``TrainFeed.max_steps_per_loop``).
          process_count: number of processes.

        Returns:
          The cadence.
        """
        eval_every = eval_every_steps(config, steps_per_epoch)
        loop_steps = steps_per_loop(config, eval_every=eval_every, total_steps=total_steps)
        return cls(
            total_steps=total_steps,
            log_every=config.log_every_steps,
            eval_every=eval_every,
            checkpoint_every=config.checkpoint_every_steps,
            loop_steps=min(loop_steps, max_loop_steps or loop_steps),
            log_spaced=frozenset(
                log_spaced_steps(total_steps) if config.log_schedule == "log" else ()
            ),
            noise_every=(config.get("noise_scale") or {}).get("every_steps"),
            steps_per_epoch=steps_per_epoch,
            padded_last_batch=bool(config.get("keep_last_batch", False))
            and num_train_examples % config.batch_size != 0,
            timed=config.get("steps_per_loop") is None and process_count == 1,
        )

    def itstime(self, event: Event, step: int) -> bool:
        """Whether `event` happens at `step` (the state after `step` updates)."""
        last = step == self.total_steps
        if event == "log":
            return step % self.log_every == 0 or step in self.log_spaced or last
        if event == "eval":
            return step % self.eval_every == 0 or last
        if event == "checkpoint":
            return step % self.checkpoint_every == 0 or last
        if event == "noise":
            if not self.noise_every or step % self.noise_every:
                return False
            # A B_simple on the padded batch of update k * steps_per_epoch would mix two
            # batch sizes: the measurement due at the step before it is skipped.
            before_padded = step % self.steps_per_epoch == self.steps_per_epoch - 1
            return not (self.padded_last_batch and before_padded)
        raise ValueError(f"unknown event {event=}; use one of log, eval, checkpoint, noise.")

    def is_boundary(self, step: int) -> bool:
        """Whether the host must look at `step`: a dispatch ends there."""
        return any(self.itstime(e, step) for e in ("log", "eval", "checkpoint", "noise"))

    def chunk_length(self, step: int, seconds_per_step: float | None) -> int:
        """Steps of the next dispatch from `step`: at most K, none past the next boundary.

        Args:
          step: the step the run has reached.
          seconds_per_step: the last dispatch's time per step (`DispatchTimer`); None
            before one was timed, which keeps a timed cadence to one step.

        Returns:
          The number of steps, at least 1 (``step`` must be below ``total_steps``).
        """
        limit = min(self.loop_steps, self.total_steps - step)
        if self.timed:
            limit = min(limit, max(1, int(LOOP_SECONDS / (seconds_per_step or LOOP_SECONDS))))
        for n in range(1, limit):
            if self.is_boundary(step + n):
                return n
        return limit

    def next_dispatch(
        self,
        step: int,
        seconds_per_step: float | None,
        stop_step: Callable[[int, int], int | None],
    ) -> tuple[int, bool]:
        """Steps of the next dispatch, and whether the run stops after it (preemption).

        Args:
          step: the step the run has reached.
          seconds_per_step: as in `chunk_length`.
          stop_step: ``PreemptionWatch.stop_step``: given the step and the steps about
            to run, the step to save and stop at, or None. Called once per dispatch.

        Returns:
          ``(n, stop)``: run n steps (0: none, stop now), then stop if ``stop``.
        """
        n = self.chunk_length(step, seconds_per_step)
        stop = stop_step(step, n)
        if stop is None:
            return n, False
        return stop - step, True


class DispatchTimer:
    """Seconds per step of the dispatches, from when the host saw each one finish.

    The host stays one dispatch ahead: after dispatching one, it waits for the one
    before (`dispatched`). A dispatch's time runs from when it was dispatched, or from
    when the dispatch before it finished if that was later (it queued behind it).

    Args:
      wait: blocks until a dispatch's output is ready (``jax.block_until_ready``).
      clock: the wall clock (``time.time``).
    """

    def __init__(self, wait: Callable[[Any], Any], clock: Callable[[], float] = time.time) -> None:
        self._wait, self._clock = wait, clock
        self.seconds_per_step: float | None = None
        self._last_done_at = clock()
        self._previous: tuple[Any, int, float] | None = None

    def dispatched(self, done: Any, num_steps: int) -> float | None:
        """Notes a dispatch of `num_steps`; waits for the one before it.

        Args:
          done: an output of the new dispatch, to wait on later.
          num_steps: its steps.

        Returns:
          When the dispatch before finished, or None if there was none in flight.
        """
        previous, self._previous = self._previous, (done, num_steps, self._clock())
        if previous is None:
            return None
        before, steps, dispatched_at = previous
        self._wait(before)
        done_at = self._clock()
        self.seconds_per_step = (done_at - max(dispatched_at, self._last_done_at)) / steps
        self._last_done_at = done_at
        return done_at

    def wait(self, done: Any) -> float:
        """Waits for `done` and every dispatch before it; returns when they finished."""
        self._wait(done)
        self._previous, self._last_done_at = None, self._clock()
        return self._last_done_at
