"""Other ways to write the per-ghost-batch sums, against the one GhostBatchNorm uses.

GhostBatchNorm's statistics are the sums of x and of x * x over each ghost batch: the
input grouped as (k, B/k, ..., F) and reduced over its middle axes. XLA:CPU spreads the
whole-batch sum of nn.BatchNorm over both cores of this machine and the grouped one
hardly at all (``experiments.bench.group_reduction``). This times, on every core and
under XLA's default options, the same sums written in other ways a layer could write them,
interleaved round by round with the whole-batch sum and the layer's own form, and
records whether each comes out bit for bit equal to the layer's form (which every
committed GBN run depends on).

Usage (from the repository root):
  .venv/bin/python -m experiments.bench.group_sum_forms            # writes results
  .venv/bin/python -m experiments.bench.group_sum_forms --rounds 3 --no-write

Writes experiments/results/bench_group_sum_forms.{md,json}.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.group_reduction import GHOST, SHAPES, digest, grouped, whole_batch
from experiments.harness import provenance, tables, timing
from experiments.harness.provenance import RESULTS_DIR

MODULE = "experiments.bench.group_sum_forms"
RESULTS_STEM = str(RESULTS_DIR / "bench_group_sum_forms")
WHOLE = "whole batch (nn.BatchNorm)"
LAYERS = "grouped, middle axes reduced (GhostBatchNorm)"

Sums = tuple[jax.Array, jax.Array]


def merged_axes(x: jax.Array, ghost: int) -> Sums:
    g = x.reshape(x.shape[0] // ghost, -1, x.shape[-1])
    return g.sum(1), (g * g).sum(1)


def per_example_first(x: jax.Array, ghost: int) -> Sums:
    g = x.reshape(x.shape[0] // ghost, ghost, -1, x.shape[-1])
    return g.sum(2).sum(1), (g * g).sum(2).sum(1)


def halves(x: jax.Array, ghost: int) -> Sums:
    half = (x.shape[0] // ghost // 2) * ghost
    first, second = grouped(x[:half], ghost), grouped(x[half:], ghost)
    return jnp.concatenate([first[0], second[0]]), jnp.concatenate([first[1], second[1]])


def variadic(x: jax.Array, ghost: int) -> Sums:
    g = x.reshape(x.shape[0] // ghost, -1, x.shape[-1])
    zero = jnp.zeros((), x.dtype)

    def add(a, b):
        return a[0] + b[0], a[1] + b[1]

    return tuple(jax.lax.reduce((g, g * g), (zero, zero), add, (1,)))


def ones_dot(x: jax.Array, ghost: int) -> Sums:
    g = x.reshape(x.shape[0] // ghost, -1, x.shape[-1])
    ones = jnp.ones((g.shape[1],), x.dtype)
    return jnp.einsum("kmf,m->kf", g, ones), jnp.einsum("kmf,kmf->kf", g, g)


def indicator_matmul(x: jax.Array, ghost: int) -> Sums:
    k, features = x.shape[0] // ghost, x.shape[-1]
    rows = x.reshape(x.shape[0], -1)
    blocks = jnp.repeat(jnp.eye(k, dtype=x.dtype), ghost, axis=1)  # (k, B)

    def per_group(v):
        return (blocks @ v).reshape(k, -1, features).sum(1)

    return per_group(rows), per_group(rows * rows)


def transposed(x: jax.Array, ghost: int) -> Sums:
    g = jnp.swapaxes(x.reshape(x.shape[0] // ghost, -1, x.shape[-1]), 0, 1)
    return g.sum(0), (g * g).sum(0)


# label -> the sums (shape (F,) for the whole batch, (k, F) for the rest)
FORMS: dict[str, Callable[[jax.Array, int], Sums]] = {
    WHOLE: whole_batch,
    LAYERS: grouped,
    "grouped as (k, B/k * ..., F)": merged_axes,
    "per example over ..., then per ghost batch": per_example_first,
    "two reductions over halves of the ghost batches": halves,
    "one variadic reduction of (x, x * x)": variadic,
    "dot products with a ones vector": ones_dot,
    "block indicator matrix (k, B) times x": indicator_matmul,
    "transposed to (B/k * ..., k, F), leading axis reduced": transposed,
}


def measure(rounds: int, calls: int) -> dict[str, dict]:
    """shape -> {"times": form -> seconds per call, one per round; "busy": form -> the
    process's CPU time over wall time, one per round (1: one core busy, 2: two);
    "digest": form -> SHA-256 of the sums}."""
    out = {}
    for name, shape in SHAPES.items():
        x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
        variants, digests, busy = [], {}, {}
        for label, form in FORMS.items():
            jitted = jax.jit(functools.partial(form, ghost=GHOST))
            digests[label] = digest(jax.block_until_ready(jitted(x)))
            busy[label] = []

            def run(n, jitted=jitted, x=x, busy=busy[label]):
                wall, cpu = time.perf_counter(), time.process_time()
                times = timing.time_calls(lambda: jax.block_until_ready(jitted(x)), n)
                busy.append((time.process_time() - cpu) / (time.perf_counter() - wall))
                return times

            variants.append(timing.Variant(label, run, {}))
        times = timing.interleave(variants, rounds, calls, name)
        out[name] = {
            "times": {k: [statistics.median(r) for r in v] for k, v in times.items()},
            "busy": busy,
            "digest": digests,
        }
    return out


def rows(measured: dict[str, dict]) -> list[dict]:
    """One row per shape and form: median µs, and the per-round ratios to the whole-batch
    sum and to the layer's form (median with its sign-test 95% interval)."""
    out = []
    for name, m in measured.items():
        times = m["times"]
        for label in FORMS:
            to_whole = [t / w for t, w in zip(times[label], times[WHOLE], strict=True)]
            to_layer = [t / g for t, g in zip(times[label], times[LAYERS], strict=True)]
            out.append(
                {
                    "shape": name,
                    "form": label,
                    "us": 1e6 * statistics.median(times[label]),
                    "cores_busy": statistics.median(m["busy"][label]),
                    "to_whole": statistics.median(to_whole),
                    "to_whole_ci95": timing.median_interval(to_whole),
                    "to_layer": statistics.median(to_layer),
                    "to_layer_ci95": timing.median_interval(to_layer),
                    "same_bits_as_layer": (
                        None if label == WHOLE else m["digest"][label] == m["digest"][LAYERS]
                    ),
                    "times": times[label],
                }
            )
    return out


def table(table_rows: list[dict]) -> str:
    def ratio(r, key):
        return "{:.2f} [{:.2f}, {:.2f}]".format(r[key], *r[f"{key}_ci95"])

    bits = {None: "-", True: "yes", False: "no"}
    cells = [
        [
            r["shape"],
            r["form"],
            f"{r['us']:.0f}",
            f"{r['cores_busy']:.2f}",
            ratio(r, "to_whole"),
            ratio(r, "to_layer"),
            bits[r["same_bits_as_layer"]],
        ]
        for r in table_rows
    ]
    header = [
        "activations",
        f"sums of x and x * x (ghost {GHOST})",
        "µs",
        "cores busy",
        "/ whole batch",
        "/ GhostBatchNorm's form",
        "same bits as GhostBatchNorm's form",
    ]
    return tables.markdown_table(header, cells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=5, help="calls per form and round")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    env = provenance.environment(MODULE, args)
    table_rows = rows(measure(args.rounds, args.calls))
    text = table(table_rows)
    if args.no_write:
        print(text)
        return
    env["load_average_end"] = os.getloadavg()
    markdown = tables.document(
        "# Ways to write the per-ghost-batch sums",
        f"Command: `{env['command']}`  \n{tables.environment_line(env)}  \nDate: {env['date']}.",
        "The sums of x and of x * x, jitted alone under XLA's default options on every "
        "core, written in each way of the table; the first row is the whole-batch sum of "
        "nn.BatchNorm, the second the per-ghost-batch sum as GhostBatchNorm writes it. "
        "Median time per call; 'cores busy': the median over rounds of the process's "
        "CPU time over the wall time (1: one core working, 2: both); the ratios are "
        "medians of the per-round ratios with their "
        f"sign-test 95% intervals ({args.rounds} rounds of {args.calls} calls, the forms "
        "interleaved). 'Same bits': whether the form's sums equal GhostBatchNorm's bit "
        "for bit on this machine.",
        text,
    )
    tables.write_outputs(RESULTS_STEM, {"environment": env, "rows": table_rows}, markdown)


if __name__ == "__main__":
    main()
