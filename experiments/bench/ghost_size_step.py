"""Train-step time of F1 at batch 4096 against the ghost batch size, side by side.

The trainer's own F1 step (``gbn_jax.trainer.steps.make_train_step`` with
``gbn_jax.models.get_model("f1", ...)``, jitted and donated as the trainer does, under
the trainer's CPU compiler options ``steps.XLA_CPU_FAST_OPTIONS``) is compiled once per
ghost size and once with plain batch norm over the whole batch (ghost 4096), then all
of them are timed in interleaved rounds, the order rotating every round. Per ghost size
the table gives the median step time and the per-round ratio to plain batch norm: its
median, quartiles, range and the distribution-free 95% interval of the median.

This is the step-time column of the ghost-size study (docs/results.md); the accuracy
columns come from the runs of ``experiments.ablation --plan settle``.

Usage (from the repository root):
  .venv/bin/python -m experiments.bench.ghost_size_step                 # writes results
  .venv/bin/python -m experiments.bench.ghost_size_step --rounds 2 --no-write

Writes experiments/results/bench_ghost_size.{md,json}.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from collections.abc import Sequence

import jax

from experiments.bench import step_speed
from experiments.harness import provenance, tables, timing
from experiments.harness.provenance import RESULTS_DIR
from gbn_jax import models
from gbn_jax.trainer.steps import XLA_CPU_FAST_OPTIONS

MODULE = "experiments.bench.ghost_size_step"
RESULTS_STEM = str(RESULTS_DIR / "bench_ghost_size")
BATCH = 4096
GHOST_SIZES = (16, 32, 64, 128, 256, 512, 1024, 4096)  # 4096: plain batch norm


def variant(ghost: int, warmup: int) -> timing.Variant:
    """The compiled, warmed-up F1 step with ghost batches of `ghost` (plain BN at BATCH)."""
    plain = ghost >= BATCH
    model = models.get_model(
        "f1",
        num_classes=10,
        norm="batch" if plain else "ghost",
        ghost_batch_size=None if plain else ghost,
    )
    regime = step_speed.paper_regime(128, BATCH)
    compiled, state, batch, key, _ = step_speed.compile_step(
        model, regime, step_speed.INPUT_SHAPE["f1"], BATCH, dict(XLA_CPU_FAST_OPTIONS)
    )
    holder = {"state": state}

    def step() -> None:
        holder["state"], metrics = compiled(holder["state"], batch, key)
        jax.block_until_ready(metrics["loss"])

    for _ in range(warmup):  # the first executions allocate and page in
        step()
    return timing.Variant(str(ghost), functools.partial(timing.time_calls, step), {})


def summarize(times: dict[str, list[list[float]]]) -> list[dict]:
    """One row per ghost size: median step time and the per-round ratio to plain BN."""
    plain = [statistics.median(r) for r in times[str(BATCH)]]
    rows = []
    for ghost in GHOST_SIZES:
        rounds = times[str(ghost)]
        ratios = [statistics.median(r) / p for r, p in zip(rounds, plain, strict=True)]
        rows.append(
            {
                "ghost": ghost,
                "ms": 1e3 * statistics.median(t for r in rounds for t in r),
                "ratio": {**timing.spread(ratios), "ci95": timing.median_interval(ratios)},
                "wall_ms": [[1e3 * t for t in r] for r in rounds],
            }
        )
    return rows


def table(rows: Sequence[dict]) -> str:
    cells = []
    for r in rows:
        s = r["ratio"]
        cells.append(
            [
                "4096 (plain BN)" if r["ghost"] >= BATCH else r["ghost"],
                BATCH // r["ghost"],
                f"{r['ms']:.1f}",
                f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}] ({s['min']:.2f}-{s['max']:.2f})",
                "[{:.3f}, {:.3f}]".format(*s["ci95"]),
            ]
        )
    header = ["ghost size", "ghost batches", "step ms (median)"]
    header += ["/ plain BN: median [quartiles] (range)", "median's 95% CI"]
    return tables.markdown_table(header, cells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    env = provenance.environment(MODULE, args)
    variants = [variant(g, args.warmup) for g in GHOST_SIZES]
    times = timing.interleave(variants, args.rounds, args.steps, f"F1 (batch {BATCH})")
    env["load_average_end"] = os.getloadavg()
    rows = summarize(times)
    text = table(rows)
    if args.no_write:
        print(text)
        return
    markdown = tables.document(
        "# F1 train-step time against the ghost batch size",
        f"Command: `{env['command']}`  \n{tables.environment_line(env)}  \nDate: {env['date']}.",
        "The trainer's F1 step at batch 4096 (jitted and donated as the trainer does, "
        "the trainer's CPU compiler options), one variant per ghost size, timed in "
        f"{args.rounds} interleaved rounds of {args.steps} steps. The ratio is each "
        "round's median step time over plain batch norm's in the same round; the "
        "interval is the sign-test 95% interval of the median ratio.",
        text,
    )
    tables.write_outputs(RESULTS_STEM, {"environment": env, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
