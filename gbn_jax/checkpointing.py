"""Checkpoints that make a killed run resume exactly: train state plus data position.

One orbax ``CheckpointManager`` under ``workdir/checkpoints``; each step directory
holds two items, ``state`` (the TrainState pytree: params, batch_stats, opt_state,
step, params0) and ``data`` (the train iterator's JSON position).

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<timestamp>`` and
renames it to ``<step>`` only once every item is complete, so a directory named by a
bare step number is always whole. ``cleanup_tmp_directories`` deletes the leftovers of
a write cut short when the manager opens, and ``latest_step`` never sees them.

References:
  Hoffer, Hubara & Soudry (2017), section 5 (long "train longer" runs must survive
  preemption without changing their result).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Opens (or creates) the checkpoint directory of a run.

    Args:
      workdir: the run's directory; checkpoints go to ``workdir/checkpoints``.
      keep: how many of the latest checkpoints to keep.

    Returns:
      A synchronous CheckpointManager: ``save`` returns once the step is on disk, so
      the caller may donate the saved buffers to the next train step right after.

    References:
      Hoffer, Hubara & Soudry (2017), section 5.
    """
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
            create=True,
        ),
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
    """Writes one checkpoint (collective: every process calls it).

    Args:
      manager: from ``make_manager``.
      step: the number of updates the state has taken.
      state: the TrainState.
      data_state: the train iterator's ``get_state()``.

    References:
      Hoffer, Hubara & Soudry (2017), section 5.
    """
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
    )


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, shardings: Any
) -> tuple[int, Any, dict] | None:
    """Restores the latest complete checkpoint onto the given shardings.

    Args:
      manager: from ``make_manager``.
      abstract_state: the TrainState's shapes and dtypes (``jax.eval_shape``).
      shardings: a matching pytree of shardings; the checkpoint may have been
        written on another device layout (e.g. two processes instead of one).

    Returns:
      ``(step, state, data_state)``, or None when there is no checkpoint.

    References:
      Hoffer, Hubara & Soudry (2017), section 5.
    """
    step = manager.latest_step()
    if step is None:
        return None
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        ),
    )
    return step, restored["state"], restored["data"]
