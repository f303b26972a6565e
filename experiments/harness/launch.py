"""Launching and resuming trainer runs (``python -m gbn_jax.main``) from the drivers.

A driver plans its runs, launches each with ``run_one`` (which resumes an unfinished
one from its checkpoints and refuses a workdir that holds another command), and writes
the finished ones' records; ``commit_files`` commits a record as it lands.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tqdm

from experiments.harness.provenance import REPO_ROOT
from gbn_jax.trainer import run_files
from gbn_jax.trainer.run_files import CONFIG_FILE, METRICS_FILE

# One line per launch of a run (JSON: seconds, exit_status), written by `run_one`.
WALL_TIME_FILE = "driver_wall_time.jsonl"
COMMAND_FILE = "driver_command.txt"


def load_config_module(config_file: str) -> Any:
    """The module of a config file (``configs/<name>.py``, relative to the repository
    root); its ``get_config(arg)`` builds the ConfigDict."""
    spec = importlib.util.spec_from_file_location(Path(config_file).stem, REPO_ROOT / config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def printable_command(argv: Sequence[str]) -> str:
    """The command as a user would type it from the repository root."""
    argv = list(argv)
    with contextlib.suppress(ValueError):  # Another drive on Windows.
        argv[0] = os.path.relpath(argv[0], REPO_ROOT)
    if argv[0].startswith(".."):  # Not the repo's virtualenv: keep it short.
        argv[0] = "python"
    return shlex.join(argv).replace(str(REPO_ROOT) + os.sep, "")


def last_step(metrics_path: Path) -> int:
    """The last step logged so far (cheap: reads the file's tail)."""
    try:
        with open(metrics_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="ignore").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def run_one(
    argv: Sequence[str],
    workdir: Path,
    *,
    total_steps: int,
    batch_size: int,
    bar: tqdm.tqdm,
    show_output: bool = False,
) -> tuple[int, float]:
    """Launches (or resumes) one trainer run and advances `bar` by images as it trains.

    The trainer's output goes to ``<workdir>/train.log`` unless `show_output`. Each
    launch appends its duration to ``<workdir>/driver_wall_time.jsonl``.

    Args:
      argv: the trainer command (``python -m gbn_jax.main ... --workdir=<workdir>``).
      workdir: the run's workdir.
      total_steps: the run's number of steps (to size the progress).
      batch_size: images per step.
      bar: a tqdm bar counting images.
      show_output: stream the trainer's output instead of logging it.

    Returns:
      (exit status, seconds this launch took).

    Raises:
      SystemExit: the workdir holds a run started with a different command.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    # Guard against silently mixing runs of two settings in one workdir.
    record = workdir / COMMAND_FILE
    text = printable_command(argv) + "\n"
    if record.exists() and record.read_text() != text:
        raise SystemExit(
            f"{workdir} holds a run of another command:\n  {record.read_text()}"
            f"which differs from\n  {text}Delete {workdir} or use another --runs_dir."
        )
    record.write_text(text)
    done = last_step(workdir / METRICS_FILE)
    bar.update(done * batch_size)
    start = time.time()
    with open(workdir / "train.log", "a") as log:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdout=None if show_output else log,
            stderr=None if show_output else subprocess.STDOUT,
        )
        while proc.poll() is None:
            time.sleep(2.0)
            step = min(last_step(workdir / METRICS_FILE), total_steps)
            if step > done:
                bar.update((step - done) * batch_size)
                done = step
    bar.update((total_steps - done) * batch_size)
    seconds = time.time() - start
    # summary.json times only the last launch; a resumed run's total is their sum.
    with open(workdir / WALL_TIME_FILE, "a") as f:
        f.write(json.dumps({"seconds": seconds, "exit_status": proc.returncode}) + "\n")
    return proc.returncode, seconds


def wall_time(workdir: str | Path, summary: dict[str, Any] | None) -> float | None:
    """Seconds a run took over all its launches (``run_one``'s log), else its summary's."""
    path = Path(workdir) / WALL_TIME_FILE
    if path.exists():
        return float(sum(line["seconds"] for line in run_files.read_json_lines(path)))
    value = (summary or {}).get("wall_time_sec")
    return float(value) if isinstance(value, int | float) else None


def resolved_config(workdir: str | Path) -> dict[str, Any] | None:
    """The config a run resolved and wrote to its workdir (config.json), or None."""
    path = Path(workdir) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else None


def commit_files(paths: Sequence[Path], message: str) -> None:
    """Commits exactly `paths` (nothing else staged goes in) to the repository that
    holds them, which may be another checkout than this one; retries a busy index."""
    repo = Path(
        subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=paths[0].parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    rel = [str(p.resolve().relative_to(repo)) for p in paths]
    for attempt in range(10):
        add = subprocess.run(["git", "add", "--", *rel], cwd=repo, capture_output=True)
        done = add.returncode == 0 and (
            subprocess.run(
                ["git", "commit", "-q", "-m", message, "--", *rel],
                cwd=repo,
                capture_output=True,
            ).returncode
            == 0
        )
        if done:
            return
        time.sleep(3 + attempt)
    tqdm.tqdm.write(f"could not commit {rel}; commit them by hand")
