"""Per-ghost-batch reductions against whole-batch ones, on one and on two threads.

The statistics of GhostBatchNorm reduce the grouped input (k, B/k, ..., F) over the
examples of each ghost batch, where nn.BatchNorm reduces (B, ..., F) over the batch. This
times the two reductions alone (a jitted sum of x and of x * x, XLA's default options),
for F1's activations (4096, 512) in ghost batches of 128 and for the first layer of the
conv net of ``ghost_norm_overhead`` (1024, 32, 32, 16), interleaved round by round, once
with the process on every core and once pinned to one core (each in a fresh process:
XLA:CPU sizes its thread pool when it starts). It also records whether each sum comes out
bit for bit the same on every core count: a reduction split over threads along its
reduced axes adds in an order that depends on how many there are.

Usage (from the repository root):
  .venv/bin/python -m experiments.bench.group_reduction            # writes results
  .venv/bin/python -m experiments.bench.group_reduction --rounds 3 --no-write

Writes experiments/results/bench_group_reduction.{md,json}.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
from typing import TYPE_CHECKING

import numpy as np

from experiments.harness import provenance, tables, timing
from experiments.harness.provenance import RESULTS_DIR

if TYPE_CHECKING:
    import jax

MODULE = "experiments.bench.group_reduction"
RESULTS_STEM = str(RESULTS_DIR / "bench_group_reduction")
SHAPES = {"f1 (4096, 512)": (4096, 512), "conv (1024, 32, 32, 16)": (1024, 32, 32, 16)}
GHOST = 128
BOTH = ("batch", "ghost")


def whole_batch(x: jax.Array, ghost: int) -> tuple[jax.Array, jax.Array]:
    """The sums of x and x * x over the batch, as nn.BatchNorm's statistics need them."""
    del ghost
    axes = tuple(range(x.ndim - 1))
    return x.sum(axes), (x * x).sum(axes)


def grouped(x: jax.Array, ghost: int) -> tuple[jax.Array, jax.Array]:
    """The same sums per ghost batch, written as GhostBatchNorm writes them: x grouped as
    (k, B/k, ..., F) and reduced over its middle axes."""
    g = x.reshape(x.shape[0] // ghost, ghost, *x.shape[1:])
    axes = tuple(range(1, g.ndim - 1))
    return g.sum(axes), (g * g).sum(axes)


def digest(sums: tuple[jax.Array, ...]) -> str:
    """SHA-256 of the sums' bytes."""
    return hashlib.sha256(b"".join(np.asarray(s).tobytes() for s in sums)).hexdigest()


def measure(rounds: int, calls: int) -> dict[str, dict]:
    """shape -> {"batch", "ghost"} -> seconds per call, one entry per round, and
    "digest" -> {"batch", "ghost"} -> SHA-256 of the two sums' bytes."""
    import jax  # here, so that a pinned process restricts its cores before XLA starts

    out = {}
    for name, shape in SHAPES.items():
        x = jax.numpy.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
        variants, digests = [], {}
        for label, form in (("batch", whole_batch), ("ghost", grouped)):
            jitted = jax.jit(functools.partial(form, ghost=GHOST))
            digests[label] = digest(jax.block_until_ready(jitted(x)))

            def call(jitted=jitted, x=x):
                jax.block_until_ready(jitted(x))

            variants.append(timing.Variant(label, functools.partial(timing.time_calls, call), {}))
        times = timing.interleave(variants, rounds, calls, name)
        out[name] = {k: [statistics.median(r) for r in v] for k, v in times.items()}
        out[name]["digest"] = digests
    return out


def run_pinned(cores: int, rounds: int, calls: int) -> dict:
    """`measure` in a fresh process restricted to the first `cores` cores."""
    code = (
        "import json, os, sys; os.sched_setaffinity(0, set(range(int(sys.argv[1]))));"
        "from experiments.bench.group_reduction import measure;"
        "print(json.dumps(measure(int(sys.argv[2]), int(sys.argv[3]))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(cores), str(rounds), str(calls)],
        capture_output=True,
        text=True,
        check=True,
        cwd=provenance.REPO_ROOT,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def rows(by_threads: dict[int, dict]) -> list[dict]:
    out = []
    for threads, measured in sorted(by_threads.items()):
        for name, times in measured.items():
            digests = [m[name]["digest"] for m in by_threads.values()]
            same_bits = {k: len({d[k] for d in digests}) == 1 for k in BOTH}
            ratios = [g / b for g, b in zip(times["ghost"], times["batch"], strict=True)]
            out.append(
                {
                    "shape": name,
                    "cores": threads,
                    "batch_us": 1e6 * statistics.median(times["batch"]),
                    "ghost_us": 1e6 * statistics.median(times["ghost"]),
                    "ratio": statistics.median(ratios),
                    "ratio_ci95": timing.median_interval(ratios),
                    "same_bits_across_cores": same_bits,
                    "times": {k: times[k] for k in BOTH},
                    "digest": times["digest"],
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=10, help="calls per variant and round")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    env = provenance.environment(MODULE, args)
    cores = sorted({1, os.cpu_count() or 1})
    table_rows = rows({c: run_pinned(c, args.rounds, args.calls) for c in cores})
    cells = [
        [
            r["shape"],
            r["cores"],
            f"{r['batch_us']:.0f}",
            f"{r['ghost_us']:.0f}",
            "{:.2f} [{:.2f}, {:.2f}]".format(r["ratio"], *r["ratio_ci95"]),
            " / ".join("yes" if r["same_bits_across_cores"][k] else "no" for k in BOTH),
        ]
        for r in table_rows
    ]
    header = [
        "activations",
        "cores",
        "whole batch µs",
        f"ghost {GHOST} µs",
        "ghost / whole",
        "same bits on every core count (whole / ghost)",
    ]
    text = tables.markdown_table(header, cells)
    if args.no_write:
        print(text)
        return
    env["load_average_end"] = os.getloadavg()
    markdown = tables.document(
        "# Per-ghost-batch against whole-batch reductions",
        f"Command: `{env['command']}`  \n{tables.environment_line(env)}  \nDate: {env['date']}.",
        "The sums of x and of x * x that batch norm's statistics need, jitted alone "
        f"(XLA's default options): over the whole batch, and per ghost batch of {GHOST} "
        "after the grouping reshape. Median time per call; the ratio is the median of "
        f"the per-round ratios with its sign-test 95% interval ({args.rounds} rounds of "
        f"{args.calls} calls). 'cores': the process pinned to that many cores. 'Same bits': "
        "whether the sums computed on every core count are bit for bit equal.",
        text,
    )
    tables.write_outputs(RESULTS_STEM, {"environment": env, "rows": table_rows}, markdown)


if __name__ == "__main__":
    main()
