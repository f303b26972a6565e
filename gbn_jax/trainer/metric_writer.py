"""The trainer's outputs: metrics.jsonl, TensorBoard events, the progress bar, summary.json.

One `MetricWriter` owns them all (big_vision's ``BigVisionMetricWriter``): ``write(step,
record)`` appends a record to metrics.jsonl (through ``gbn_jax.trainer.run_files``), adds its
scalars to TensorBoard and shows the train metrics on the progress bar; ``advance``
moves the bar; ``close`` closes the files. On processes other than 0 it writes nothing
and shows nothing, so the loop calls it alike on every process.

`TrainingRate` is the examples/sec of the records: the devices' own rate between two
logs, with the host's pauses (evaluations read, checkpoint saves) left out.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ml_collections
import numpy as np

from gbn_jax.trainer import run_files

# Fields of a metrics.jsonl record that measure the machine, not the training.
WALL_CLOCK_FIELDS = ("examples_per_sec",)
# A record holds a B_simple measurement when it has this field (config.noise_scale).
NOISE_SCALE_FIELD = "noise_b_simple"


class TrainingRate:
    """Examples per second between two logs, evaluations and checkpoint saves left out.

    Times are when the host saw a dispatch finish; the devices run the next dispatch
    meanwhile, so a log costs no device time and the rate is the devices' own.

    Args:
      batch_size: examples per step.
      clock: the wall clock (``time.time``).
    """

    def __init__(self, batch_size: int, clock: Callable[[], float] = time.time) -> None:
        self.batch_size = batch_size
        self.clock = clock
        self.steps = 0  # Steps dispatched since the last `take_steps`.
        self.restart(clock())

    def take_steps(self) -> int:
        """The steps dispatched since the last call (a log's share), counting anew."""
        steps, self.steps = self.steps, 0
        return steps

    def restart(self, now: float) -> None:
        """Starts the next interval's clock (its steps count from its log's snapshot)."""
        self.start, self.paused = now, 0.0

    def pause(self, since: float, until: float) -> None:
        """Leaves [since, until] out (clipped to this interval)."""
        self.paused += max(0.0, until - max(since, self.start))

    def examples_per_sec(self, steps: int, until: float) -> float:
        """The rate of `steps` steps run from the interval's start `until` then."""
        return steps * self.batch_size / max(until - self.start - self.paused, 1e-9)


class MetricWriter:
    """metrics.jsonl, TensorBoard and the progress bar of one run (process 0 only).

    Opening it cuts metrics.jsonl back to `start_step` (a resumed run appends where
    the restored checkpoint left off; the TensorBoard files are kept, a resumed run
    starts a new event file) and, when the run trains on, removes summary.json: a
    summary is a finished run's, and this one finishes anew (it resumed from an older
    checkpoint than the last, or goes on to more steps).

    Args:
      workdir: the run's directory.
      start_step: the step the run starts (or resumes) at.
      total_steps: the run's last step (the bar's length).
      batch_size: examples per step (for `TrainingRate`).
      enabled: whether this process writes (``jax.process_index() == 0``).
      clock: the wall clock.
    """

    def __init__(
        self,
        workdir: str,
        *,
        start_step: int,
        total_steps: int,
        batch_size: int,
        enabled: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.workdir = workdir
        self.metrics_path = run_files.path(workdir, run_files.METRICS_FILE)
        self.enabled = enabled
        self.clock = clock
        self._tensorboard = self._bar = None
        if enabled:
            truncate_metrics(self.metrics_path, start_step)
            summary_path = run_files.path(workdir, run_files.SUMMARY_FILE)
            if start_step < total_steps and os.path.exists(summary_path):
                os.remove(summary_path)
            import tensorboardX
            import tqdm

            self._tensorboard = tensorboardX.SummaryWriter(
                run_files.path(workdir, run_files.TENSORBOARD_DIR)
            )
            self._bar = tqdm.tqdm(
                total=total_steps, initial=start_step, mininterval=1.0, smoothing=0.1
            )
        self.rate = TrainingRate(batch_size, clock)

    def advance(self, num_steps: int) -> None:
        """Counts `num_steps` more steps dispatched (the bar and the rate)."""
        self.rate.steps += num_steps
        if self._bar is not None:
            self._bar.update(num_steps)

    def write(self, step: int, record: dict[str, Any]) -> None:
        """Appends a record of `step` to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        run_files.append_metrics(self.metrics_path, [record])
        for key, value in record.items():
            if key != "step":
                self._tensorboard.add_scalar(key, value, step)
        if "train_loss" in record:
            self._bar.set_postfix(
                loss=f"{record['train_loss']:.4f}",
                acc=f"{record['train_accuracy']:.4f}",
                img_s=f"{record['examples_per_sec']:.0f}",
                refresh=False,
            )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leaves the time inside the block out of the training rate (a checkpoint save)."""
        since = self.clock()
        try:
            yield
        finally:
            self.rate.pause(since, self.clock())

    def read(self) -> list[dict[str, Any]]:
        """The run's records (all of them, across resumes); [] on other processes."""
        return run_files.read_json_lines(self.metrics_path) if self.enabled else []

    def write_json(self, name: str, obj: Any) -> None:
        """Writes a JSON file of the workdir (``run_files.SUMMARY_FILE``, ...)."""
        if self.enabled:
            run_files.write_json(run_files.path(self.workdir, name), obj)

    def close(self) -> None:
        """Closes the bar and the TensorBoard file."""
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        self._bar = self._tensorboard = None


def truncate_metrics(metrics_path: str, last_step: int) -> None:
    """Keeps the records up to `last_step`, so that a resumed run appends where it left.

    A noise-scale record of `last_step` itself goes too: it was measured after the
    checkpoint, on the next step's batch, and the resumed run measures it again.
    """
    records = [
        r
        for r in run_files.read_json_lines(metrics_path)
        if r["step"] < last_step or (r["step"] == last_step and NOISE_SCALE_FIELD not in r)
    ]
    run_files.rewrite_metrics(metrics_path, records)


def summarize(
    records: list[dict[str, Any]],
    *,
    start_step: int,
    total_steps: int,
    wall_time: float,
    environment: dict[str, Any],
    config: dict[str, Any],
) -> dict[str, Any]:
    """The run's summary: final and best evaluations, from all its records.

    "best" on the test split is the authors' best_prec1 (selected on the test set);
    with a validation split, the honest pick is the test accuracy at the best
    validation step.

    Args:
      records: metrics.jsonl, complete across resumes ([] off process 0).
      start_step: the step this run resumed from (0: none).
      total_steps: the run's last step.
      wall_time: seconds this run took.
      environment: devices, device_kind, platform and process_count.
      config: the config as a dict.

    Returns:
      The summary (summary.json).
    """
    evals = [r for r in records if "eval_accuracy" in r]
    rates = [r["examples_per_sec"] for r in records if "examples_per_sec" in r]
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
        **environment,
        "config": config,
    }


def _last(records: Iterable[dict], key: str) -> Any:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON values (config.json, summary.json)."""
    return json.loads(config.to_json_best_effort())
