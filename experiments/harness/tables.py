"""Markdown tables and the JSON + markdown pair every result is written as."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table: header, rule, one line a row (an empty cell as ``| |``)."""

    def line(cells: Sequence[Any]) -> str:
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])


def mean_std_n(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (ddof=1; None for fewer than two values) and count."""
    if not len(values):
        return None, None, 0
    a = np.asarray(values, np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None), int(a.size)


def cell(value: float | None, std: float | None = None, sign: bool = False, digits: int = 2) -> str:
    """A table cell: ``12.34 ± 0.56`` (``+12.34`` with `sign`; ``-`` for no value; no
    ``±`` without a standard deviation)."""
    if value is None:
        return "-"
    text = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def stat_cell(
    stat: dict[str, Any] | None, sign: bool = False, digits: int = 2, count: bool = False
) -> str:
    """`cell` of a ``{mean, std, n}`` dict; with `count`, `` (n=k)`` unless k is 1."""
    if not stat or stat["mean"] is None:
        return "-"
    text = cell(stat["mean"], stat["std"], sign, digits)
    return text + (f" (n={stat['n']})" if count and stat["n"] != 1 else "")


def environment_line(env: dict[str, Any]) -> str:
    """The machine of a benchmark's record (``provenance.environment``) and its load
    average at the start and the end, in one line."""
    start = tuple(round(x, 1) for x in env["load_average_start"])
    end = tuple(round(x, 1) for x in env["load_average_end"])
    return (
        f"Hardware: {env['cpu']} ({env['cpu_count']} cores), {env['device_kind']}; "
        f"jax {env['jax']}, torch {env.get('torch')}. Load average (1/5/15 min) at start "
        f"{start}, at end {end}."
    )


def document(*blocks: str) -> str:
    """Markdown blocks (a title, paragraphs, tables) separated by blank lines."""
    return "\n\n".join(blocks) + "\n"


def write_outputs(stem: str, record: dict[str, Any], markdown: str) -> None:
    """Writes ``stem.json`` and ``stem.md`` and prints the markdown."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"wrote {stem}.md and {stem}.json")
