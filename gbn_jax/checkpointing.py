"""Checkpoints that make a stopped run resume exactly, written in the background.

One orbax ``CheckpointManager`` under ``workdir/checkpoints``; each step directory
holds the items ``state`` (the TrainState pytree: params, batch_stats, opt_state, step,
params0), ``data`` (the train iterator's JSON position) and ``train_metrics`` (the on-device
train-metrics sums since the last log, so that a run stopped between two logs still
logs exactly what an uninterrupted one does; checkpoints written before this item
existed restore with empty sums; orbax reserves the name ``metrics``).

Asynchronous: ``save`` returns once every array has been copied to host memory (orbax
transfers all arrays before it returns unless told to defer some, which this module
does not), so the caller may donate the saved buffers to the next step at once; the
files are written, and the step committed, by a background thread while training goes
on. ``wait_until_finished`` joins it (before exiting, and before a save that must be
on disk now).

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<timestamp>`` and
renames it to ``<step>`` only once every item is complete (on every process), so a
directory named by a bare step number is always whole. ``cleanup_tmp_directories``
deletes the leftovers of a write cut short when the manager opens, and
``latest_step`` never sees them.

Preemption: `PreemptionWatch` says when to save and stop: on SIGTERM (what Cloud TPU,
GCE and Kubernetes send before they take a machine back), at the same step on every
process. It is the only caller of JAX's preemption sync point: the manager's own calls
(orbax asks it at every save, with the checkpoint's step, also from its background
thread) are turned off, since the protocol needs one caller that counts every step.

References:
  Hoffer, Hubara & Soudry (2017), section 5 (long "train longer" runs must survive
  preemption without changing their result).
"""

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Opens (or creates) the checkpoint directory of a run.

    Args:
      workdir: the run's directory; checkpoints go to ``workdir/checkpoints``.
      keep: how many of the latest checkpoints to keep.

    Returns:
      An asynchronous CheckpointManager (see the module docstring).

    References:
      Hoffer, Hubara & Soudry (2017), section 5.
    """
    return _CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            create=True,
        ),
    )


class _CheckpointManager(ocp.CheckpointManager):
    """Orbax's manager without its own calls to the preemption sync point."""

    def reached_preemption(self, step: int) -> bool:
        del step
        return False


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_state: dict,
    metrics: Any = None,
) -> None:
    """Starts writing one checkpoint (collective: every process calls it).

    Returns once the arrays are in host memory; the write goes on in the background.

    Args:
      manager: from ``make_manager``.
      step: the number of updates the state has taken.
      state: the TrainState.
      data_state: the train iterator's ``get_state()``.
      metrics: the train-metrics accumulator (``steps.zero_metrics`` layout), if any.

    References:
      Hoffer, Hubara & Soudry (2017), section 5.
    """
    items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state)}
    if metrics is not None:
        items["train_metrics"] = ocp.args.StandardSave(metrics)
    manager.save(step, args=ocp.args.Composite(**items))


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    shardings: Any,
    abstract_metrics: Any = None,
    metrics_shardings: Any = None,
) -> tuple[int, Any, dict, Any] | None:
    """Restores the latest complete checkpoint onto the given shardings.

    Args:
      manager: from ``make_manager``.
      abstract_state: the TrainState's shapes and dtypes (``jax.eval_shape``).
      shardings: a matching pytree of shardings; the checkpoint may have been
        written on another device layout (e.g. two processes instead of one).
      abstract_metrics: shapes of the metrics accumulator, to restore it too.
      metrics_shardings: its shardings.

    Returns:
      ``(step, state, data_state, metrics)``, or None when there is no checkpoint;
      ``metrics`` is None when not asked for or not in the checkpoint.

    References:
      Hoffer, Hubara & Soudry (2017), section 5.
    """
    step = manager.latest_step()
    if step is None:
        return None

    def target(abstract, sharding):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sharding
        )

    items = {
        "state": ocp.args.StandardRestore(target(abstract_state, shardings)),
        "data": ocp.args.JsonRestore(),
    }
    saved_items = manager.directory / str(step)
    with_metrics = abstract_metrics is not None and (saved_items / "train_metrics").exists()
    if with_metrics:
        items["train_metrics"] = ocp.args.StandardRestore(
            target(abstract_metrics, metrics_shardings)
        )
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    metrics = restored["train_metrics"] if with_metrics else None
    return step, restored["state"], restored["data"], metrics


class PreemptionWatch:
    """Tells the training loop where to save a checkpoint and stop: after a SIGTERM.

    One process: a SIGTERM handler sets a flag (installed by the constructor from the
    main thread; ``close``, or leaving a ``with`` block, puts the previous handler
    back), and the run stops at the step it has reached. Several processes: JAX's
    preemption service (started by ``jax.distributed.initialize``) catches the SIGTERM
    of any process and has them agree on a step, one past the furthest any of them had
    announced (``multihost_utils.reached_preemption_sync_point``, which must be called
    with every step in order); every process runs up to that step and saves it.
    """

    def __init__(self):
        self._multi_process = jax.process_count() > 1
        self._notice = threading.Event()
        self._previous = None
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self._notice.set()

    def stop_step(self, step: int, num_steps: int) -> int | None:
        """Before running steps step+1, ..., step+num_steps: where to stop, if anywhere.

        Args:
          step: the step the run has reached.
          num_steps: the steps about to be dispatched.

        Returns:
          None to go on; else the step to save and stop at: ``step`` itself on one
          process, and on several the first of the coming steps that the processes
          agreed on (the same on every process). Call it before every dispatch.
        """
        if not self._multi_process:
            return step if self._notice.is_set() else None
        for candidate in range(step + 1, step + num_steps + 1):
            try:
                if multihost_utils.reached_preemption_sync_point(candidate):
                    return candidate
            except RuntimeError:  # The preemption service is turned off.
                return None
        return None

    def close(self) -> None:
        """Puts the previous SIGTERM handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> "PreemptionWatch":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
