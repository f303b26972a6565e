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
GCE and Kubernetes send before they take a machine back), at the same point of the run
on every process.

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
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            create=True,
        ),
    )


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
    """Tells the training loop when to save a checkpoint and stop: after a SIGTERM.

    One process: a SIGTERM handler sets a flag (installed by the constructor from the
    main thread, the previous handler put back by ``close``). Several processes: JAX's
    preemption service (started by ``jax.distributed.initialize``) catches the SIGTERM
    of any process and agrees with the others on a sync point, so every process sees
    ``reached`` turn True at the same call and saves the same step
    (``multihost_utils.reached_preemption_sync_point``; orbax's
    ``CheckpointManager.reached_preemption`` is the same call).

    Usage: call ``reached(i)`` once per dispatch, with i = 0, 1, 2, ... counted alike on
    every process (the sync point is "one more than the largest i seen when the notice
    came", so the calls must not skip numbers).
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

    def reached(self, sync_index: int) -> bool:
        """Whether to save and stop now (the same answer on every process).

        Args:
          sync_index: the number of earlier calls in this process.
        """
        if not self._multi_process:
            return self._notice.is_set()
        try:
            return multihost_utils.reached_preemption_sync_point(sync_index)
        except RuntimeError:  # The preemption service is turned off.
            return False

    def close(self) -> None:
        """Puts the previous SIGTERM handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
