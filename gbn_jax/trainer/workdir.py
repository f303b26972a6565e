"""A workdir is a run's record: the config that started it, and each change made since.

The first start of a run writes ``workdir/config.json``; nothing rewrites it. A restart
compares its config with the run's (config.json updated by the changes recorded in
``workdir/config_changes.jsonl``) before any compute, so that a workdir never mixes two
runs. A difference in a field of ``ALLOWED_CHANGES`` may continue the run when asked
for (``--allow_config_change``); the trainer appends it to config_changes.jsonl with the
step it applies from. A difference anywhere else is another run: it needs a new workdir.

docs/workdir.md describes everything a workdir holds.
"""

import datetime
import json
import os
from collections.abc import Callable
from typing import Any

from gbn_jax.trainer import run_files

CONFIG_FILE = run_files.CONFIG_FILE
CHANGES_FILE = "config_changes.jsonl"

# Fields a restart may change with --allow_config_change, and why each leaves the
# updates the run has made and will make as they were: they say how long the run goes
# on, when it evaluates, logs, measures and saves, how its steps are dispatched, and
# where its files are. Everything else (model, regime, learning rate, batch, data,
# seed, protocol switches, XLA options) defines the run.
ALLOWED_CHANGES: dict[str, str] = {
    "max_steps": "where the run stops",
    "regime.epochs": "where the run stops, when no learning-rate or weight-decay change moves",
    "eval_every_steps": "evaluation cadence",
    "eval_every_epochs": "evaluation cadence",
    "eval_batch_size": "evaluation batches (the training is not evaluated in them)",
    "log_every_steps": "log cadence",
    "log_schedule": "log cadence",
    "checkpoint_every_steps": "checkpoint cadence",
    "keep_checkpoints": "how many checkpoints are kept",
    "noise_scale.every_steps": "B_simple cadence (a measurement changes no update)",
    "steps_per_loop": "steps per dispatch (no result changes, bit for bit)",
    "device_loop": "one loop program or one program per step (no result changes)",
    "device_resident_data": "where the batches are gathered (no result changes)",
    "data_dir": "where the dataset files are",
}


class ConfigChangeError(ValueError):
    """A restart's config differs from the config of the run in its workdir."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{dotted.path: leaf}`` (lists are leaves).

    >>> flatten({"model": {"norm": "ghost", "ghost_batch_size": 32}, "seed": 0})
    {'model.norm': 'ghost', 'model.ghost_batch_size': 32, 'seed': 0}
    """
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    """The inverse of ``flatten``."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def run_config(workdir: str) -> dict | None:
    """The config the run in ``workdir`` follows now, or None for a new workdir.

    Args:
      workdir: the run's directory.

    Returns:
      config.json with the changes of config_changes.jsonl applied, as a nested dict.
    """
    first = run_files.read_json(run_files.path(workdir, CONFIG_FILE))
    if first is None:
        return None
    flat = flatten(first)
    for record in _read_changes(workdir):
        flat.update({name: change["new"] for name, change in record["changes"].items()})
    return unflatten(flat)


def differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted.path: (old, new)}`` of the leaves that differ.

    A field absent on one side and None (unset) on the other is no difference: fields
    added to the trainer later, unset by default, leave older workdirs resumable.
    """
    old_flat, new_flat = flatten(old), flatten(new)
    return {
        name: (old_flat.get(name), new_flat.get(name))
        for name in sorted(old_flat.keys() | new_flat.keys())
        if old_flat.get(name) != new_flat.get(name)
    }


def check_restart(
    workdir: str,
    config: dict,
    *,
    allow_change: bool,
    fixed: Callable[[dict], Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Checks a (re)start's config against the run in ``workdir``; no files are written.

    Args:
      workdir: the run's directory.
      config: the new config as JSON data (``json.loads(config.to_json_best_effort())``).
      allow_change: apply differences in ``ALLOWED_CHANGES`` (``--allow_config_change``).
      fixed: what an allowed change must leave equal, computed from either config (the
        trainer passes the step-indexed learning-rate and weight-decay schedule, so that
        ``regime.epochs`` only moves the end); a difference there forbids the change.

    Returns:
      The allowed differences to record with ``record_changes`` (empty for a new
      workdir and for the run's own config).

    Raises:
      ConfigChangeError: naming the workdir and each differing field with its old and
        new value, and how to proceed.
    """
    previous = run_config(workdir)
    if previous is None:
        return {}
    changes = differences(previous, config)
    if not changes:
        return {}
    forbidden = sorted(name for name in changes if name not in ALLOWED_CHANGES)
    moved = "regime.epochs" in changes and fixed is not None and fixed(previous) != fixed(config)
    if moved:
        forbidden.append("regime.epochs")
    if not forbidden and allow_change:
        return changes
    lines = [
        f"{name}: {old!r} -> {new!r}" + (" (defines the run)" if name in forbidden else "")
        for name, (old, new) in changes.items()
    ]
    if moved:
        lines.append("(regime.epochs moves a learning-rate or weight-decay change of the run)")
    if forbidden:
        how = (
            "A run cannot change the fields that define it: to train with this config, "
            "use a new --workdir."
        )
    else:
        how = (
            "These changes may continue the run: rerun with --allow_config_change to apply "
            f"them (recorded in {os.path.join(workdir, CHANGES_FILE)}), or use a new "
            "--workdir for a run of its own."
        )
    raise ConfigChangeError(
        f"{workdir} holds a run started with another config "
        f"({os.path.join(workdir, CONFIG_FILE)}); this config differs in:\n  "
        + "\n  ".join(lines)
        + f"\n{how}"
    )


def write_config(workdir: str, config: dict) -> None:
    """Writes config.json at the first start of a run; a restart keeps the first one."""
    path = run_files.path(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        run_files.write_json(path, config)


def record_changes(workdir: str, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Appends allowed changes to config_changes.jsonl: the step they apply from, the
    time (UTC) and each field's old and new value."""
    if not changes:
        return
    record = {
        "step": step,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "changes": {name: {"old": old, "new": new} for name, (old, new) in changes.items()},
    }
    with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_changes(workdir: str) -> list[dict]:
    return run_files.read_json_lines(os.path.join(workdir, CHANGES_FILE))
