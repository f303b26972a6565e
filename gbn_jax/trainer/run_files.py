"""The files of a run's workdir: their names, and the one way to read and write them.

A workdir holds ``config.json`` and ``regime.json`` (what ran), ``metrics.jsonl`` (one
JSON object per logged step), ``summary.json`` (written when the run finishes, so its
presence marks a finished run), ``tb/`` and ``checkpoints/``. The trainer, the
experiments and the plots all read them through this module, with one rule for
``metrics.jsonl`` and the run's other JSON-lines logs: a last line cut short (a process
killed mid-write) is dropped with a warning; a line that is not valid JSON anywhere else
is an error naming the file and the line.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from typing import Any

CONFIG_FILE = "config.json"
REGIME_FILE = "regime.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tb"


class CorruptRunFileError(ValueError):
    """A line of a run's file that is neither valid JSON nor a cut-short last line."""


def path(workdir: str | os.PathLike[str], name: str) -> str:
    """The path of file `name` in `workdir`."""
    return os.path.join(os.fspath(workdir), name)


def read_json_lines(metrics_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (metrics.jsonl and the run's other logs), in file
    order ([] if there is no file).

    Raises:
      CorruptRunFileError: a line other than the last is not a JSON object.
    """
    metrics_path = os.fspath(metrics_path)
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # A file that ends in a newline splits into a last empty string: not a line.
    if lines and lines[-1] == "":
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not a JSON object")
        except ValueError as error:
            if number == len(lines):
                warnings.warn(
                    f"{metrics_path}: dropped its last line {number}, cut short ({error}); "
                    "a process was stopped while writing it.",
                    stacklevel=2,
                )
                break
            raise CorruptRunFileError(
                f"{metrics_path}, line {number}: not a JSON object ({error}). Only the last "
                "line may be cut short; repair or remove that line, or start a new workdir."
            ) from None
        records.append(record)
    return records


def append_metrics(metrics_path: str | os.PathLike[str], records: Iterable[dict]) -> None:
    """Appends records to metrics.jsonl, one line each, flushed to the OS."""
    with open(metrics_path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()


def rewrite_metrics(metrics_path: str | os.PathLike[str], records: Iterable[dict]) -> None:
    """Replaces metrics.jsonl by `records`, atomically (a crash leaves old or new)."""
    tmp = os.fspath(metrics_path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, metrics_path)


def write_json(file_path: str | os.PathLike[str], obj: Any) -> None:
    """Writes `obj` as indented JSON, atomically."""
    tmp = os.fspath(file_path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, file_path)


def read_json(file_path: str | os.PathLike[str]) -> Any | None:
    """A JSON file's content, or None if there is no such file.

    Raises:
      CorruptRunFileError: the file is not valid JSON (these files are written
        atomically, so a cut-short one means damage, not a crash mid-write).
    """
    file_path = os.fspath(file_path)
    if not os.path.exists(file_path):
        return None
    with open(file_path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError as error:
        raise CorruptRunFileError(
            f"{file_path}: not valid JSON ({error}); restore it or start a new workdir."
        ) from None
