"""Checkpoints that make a stopped run resume exactly, written in the background.

One orbax ``CheckpointManager`` under ``workdir/checkpoints``; each step directory
holds the items ``state`` (the TrainState pytree: params, batch_stats, opt_state, step,
params0), ``data`` (the train iterator's JSON position) and ``train_metrics`` (the on-device
train-metrics sums since the last log, so that a run stopped between two logs still
logs exactly what an uninterrupted one does; a checkpoint without it restores with
empty sums; orbax reserves the name ``metrics``).

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

Damaged checkpoints: ``restore_latest`` restores the newest checkpoint that can be
read; newer ones that cannot (a file cut short or lost) are reported and moved aside
to ``<step>.damaged-<n>``, never deleted. Failed writes (a full disk): ``save`` and
``wait_until_finished`` raise `CheckpointError` naming the step, the free space and the
intact checkpoints; orbax deletes old checkpoints only after a write has succeeded.

Preemption: `PreemptionWatch` says when to save and stop: on SIGTERM (what Cloud TPU,
GCE and Kubernetes send before they take a machine back), at the same step on every
process. It is the only caller of JAX's preemption sync point: the manager's own calls
(orbax asks it at every save, with the checkpoint's step, also from its background
thread) are turned off, since the protocol needs one caller that counts every step.
"""

import json
import os
import shutil
import signal
import sys
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
    """Orbax's manager without its own calls to the preemption sync point, which
    remembers the step it writes (to name it when the background write fails)."""

    writing_step: int | None = None

    def reached_preemption(self, step: int) -> bool:
        del step
        return False


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no checkpoint of a run could be read."""


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_state: dict,
    metrics: Any = None,
) -> None:
    """Starts writing one checkpoint (collective: every process calls it).

    Returns once the arrays are in host memory; the write goes on in the background.
    The write before it is joined first, so that its failure surfaces here.

    Args:
      manager: from ``make_manager``.
      step: the number of updates the state has taken.
      state: the TrainState.
      data_state: the train iterator's ``get_state()``.
      metrics: the train-metrics accumulator (``steps.zero_metrics`` layout), if any.

    Raises:
      CheckpointError: this write or the one before failed (a full disk, say); the
        checkpoints already on disk are intact.
    """
    wait_until_finished(manager)
    items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state)}
    if metrics is not None:
        items["train_metrics"] = ocp.args.StandardSave(metrics)
    manager.writing_step = step
    try:
        saved = manager.save(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Any write error: the run stops with what to do.
        raise CheckpointError(_save_failure(manager, step, e)) from e
    if not saved:
        # Orbax skips a step at or below its latest one; a run never asks for that.
        raise CheckpointError(
            f"orbax skipped the checkpoint of step {step} in {manager.directory}: it holds "
            f"step {manager.latest_step()} already. Move that directory aside and rerun."
        )


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Waits for the background write of the last checkpoint.

    Raises:
      CheckpointError: the write failed; the message names its step, the free space
        and the intact checkpoints to resume from.
    """
    try:
        manager.wait_until_finished()
    except Exception as e:  # Any write error: the run stops with what to do.
        raise CheckpointError(
            _save_failure(manager, getattr(manager, "writing_step", None), e)
        ) from e


def _save_failure(manager: ocp.CheckpointManager, step: int | None, error: Exception) -> str:
    """What failed, the free space, what is intact and how to resume."""
    directory = str(manager.directory)
    try:
        usage = shutil.disk_usage(directory)
        space = f"{usage.free / 2**20:.0f} MiB free of {usage.total / 2**20:.0f} MiB"
    except OSError as e:
        space = f"free space unknown ({e})"
    # Orbax renames a step's directory to its bare number only once every file is
    # written; the failed write stays a temporary directory, deleted at the next start.
    intact = _complete_steps(directory)
    label = "step" if len(intact) == 1 else "steps"
    kept = (
        f"The checkpoints written before ({label} {', '.join(map(str, intact))}) are intact"
        if intact
        else "No checkpoint was written before"
    )
    resume = (
        f"rerun the same command to resume from step {intact[-1]}"
        if intact
        else "rerun the same command to start again"
    )
    return (
        f"could not write the checkpoint of step {step} to {directory}: {_reason(error)}. "
        f"Disk: {space}. {kept}; free some space (or move the workdir) and {resume}."
    )


def _complete_steps(directory: str) -> list[int]:
    """The steps of the whole checkpoints in ``directory`` (bare step numbers)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def _reason(error: BaseException, limit: int = 300) -> str:
    """The root cause of an exception (orbax wraps TensorStore's errors, which say
    which file failed how) as its type and first line, cut to ``limit``."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    shardings: Any,
    abstract_metrics: Any = None,
    metrics_shardings: Any = None,
) -> tuple[int, Any, dict, Any] | None:
    """Restores the newest checkpoint that can be read onto the given shardings.

    A checkpoint that cannot be read (a file cut short or missing) is reported with
    its step and the reason, and the one before it is tried. Once one restores, the
    unreadable newer ones are moved aside to ``<step>.damaged-<n>`` (never deleted),
    so that the manager's bookkeeping and the next saves see the restored step as the
    latest; the run then goes on exactly as if that one had been the latest.

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

    Raises:
      CheckpointError: there are checkpoints and none can be read; the message names
        each with what was wrong with it.
    """
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = _restore(
                manager, step, abstract_state, shardings, abstract_metrics, metrics_shardings
            )
        except Exception as e:  # Any unreadable file: the checkpoint before may be whole.
            failures.append((step, _reason(e)))
            _warn(
                f"checkpoint {step} in {manager.directory} cannot be restored ({_reason(e)}); "
                "trying the one before"
            )
            continue
        if failures:
            moved = _set_aside(manager, [s for s, _ in failures])
            _warn(
                f"resuming from checkpoint {step}, the newest that restores; moved aside "
                f"(not deleted): {', '.join(moved)}"
            )
        return restored
    if failures:
        raise CheckpointError(
            f"no checkpoint in {manager.directory} can be restored:\n  "
            + "\n  ".join(f"step {s}: {reason}" for s, reason in failures)
            + "\nMove the checkpoints directory aside to start the run again, or use a "
            "new --workdir."
        )
    return None


def _restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    shardings: Any,
    abstract_metrics: Any,
    metrics_shardings: Any,
) -> tuple[int, Any, dict, Any]:
    """Restores one checkpoint; raises on any file that is missing or cannot be read."""

    def target(abstract, sharding):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sharding
        )

    items = {
        "state": ocp.args.StandardRestore(target(abstract_state, shardings)),
        "data": ocp.args.JsonRestore(),
    }
    saved_items = manager.directory / str(step)
    # Checkpoints written before the metrics item existed restore with empty sums; one
    # whose metadata lists the item but lacks its directory is damaged.
    listed = _saved_item_names(saved_items)
    if "train_metrics" in listed and not (saved_items / "train_metrics").exists():
        raise FileNotFoundError(f"{saved_items / 'train_metrics'} is missing")
    with_metrics = abstract_metrics is not None and (saved_items / "train_metrics").exists()
    if with_metrics:
        items["train_metrics"] = ocp.args.StandardRestore(
            target(abstract_metrics, metrics_shardings)
        )
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if not isinstance(restored["data"], dict):
        raise ValueError(f"the data position in {saved_items / 'data'} is missing")
    metrics = restored["train_metrics"] if with_metrics else None
    return step, restored["state"], restored["data"], metrics


def _saved_item_names(step_dir: Any) -> set[str]:
    """The items a checkpoint's metadata lists (empty when it cannot be read)."""
    try:
        metadata = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
        return set(metadata.get("item_handlers") or {})
    except (OSError, ValueError, AttributeError):
        return set()


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> list[str]:
    """Renames unreadable checkpoints to ``<step>.damaged-<n>``, which orbax ignores,
    and reloads the manager's list of steps; returns the new names."""
    moved = []
    if jax.process_index() == 0:
        for step in steps:
            source = os.path.join(str(manager.directory), str(step))
            n = 1
            while os.path.exists(f"{source}.damaged-{n}"):
                n += 1
            os.rename(source, f"{source}.damaged-{n}")
            moved.append(os.path.basename(f"{source}.damaged-{n}"))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gbn_jax_checkpoints_set_aside")
    manager.reload()
    return moved or [f"{s}.damaged-<n>" for s in steps]


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


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
