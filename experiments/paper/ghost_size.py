"""Which ghost size to use: F1 at batch 4096 and LR 0.566 with ghost sizes 16-4096.

Reads the settle plan's runs (``ablation.settle_plan``: +GBN with ghost sizes 16-1024,
seeds 0-2; ghost 128 is default +GBN and 4096, plain batch norm, default +LR) and the
step-time benchmark (``experiments.bench.ghost_size_step``). Every run of the table is
taken from one machine type (`claims.machine`), the one the ghost sizes 16-1024 ran on:
where the committed record of ghost 128 or 4096 ran on another type, its re-run on this one
(experiments/results/ablation_f1/same_cpu_reruns) stands in, so every pair is
bit-reproducible on one machine type.

Per ghost size: final validation and test accuracy (mean and 95% t interval over
seeds), the paired difference to plain batch norm on both splits (95% t interval), and
the step time relative to plain batch norm.

Usage:

  .venv/bin/python -m experiments.paper.ghost_size   # experiments/results/ghost_size.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.harness import tables
from experiments.harness.provenance import RESULTS_DIR
from experiments.paper import ablation, claims, verdicts

PLAIN = 4096  # ghost size = batch: ordinary batch norm


def _new_sizes() -> tuple[int, ...]:
    """The ghost sizes whose runs the plan added (not today's +GBN or +LR)."""
    return tuple(g for g in ablation.GHOST_SIZES if ablation.ghost_group(g)[0] != "default")


def study_machine(results: dict[tuple[str, str, int], dict]) -> str:
    """The one machine type (`claims.machine`) the plan's ghost-size runs ran on."""
    models = {
        claims.machine(r)
        for g in _new_sizes()
        for r in claims.runs(results, ablation.ghost_group(g)).values()
    }
    if len(models) != 1:
        raise ValueError(
            f"The ghost-size runs ran on {sorted(models) or 'no'} machine types; the study "
            "pairs runs of one type. Re-run the missing sizes on one machine type."
        )
    return models.pop()


def records_on(
    results: dict[tuple[str, str, int], dict],
    reruns: dict[tuple, dict],
    ghost: int,
    on: str,
) -> dict[int, dict]:
    """seed -> the record of one ghost size on machine type `on`, seeds 0-2 (a seed with
    no record on that type is left out)."""
    group, column = claims.recorded_as(ablation.ghost_group(ghost))
    committed = claims.runs(results, (group, column))
    out = {}
    for seed in ablation.SELECTION_SEEDS:
        record = committed.get(seed)
        if record is None or claims.machine(record) != on:
            record = reruns.get((group, column, seed, on))
        if record is not None:
            out[seed] = record
    return out


def step_ratios(results_dir: Path) -> dict[int, dict]:
    """ghost size -> the benchmark's step-time ratio to plain batch norm ({} if not run)."""
    path = results_dir / "bench_ghost_size.json"
    if not path.exists():
        return {}
    bench = json.loads(path.read_text())
    cpu = bench["environment"]["cpu"]
    return {r["ghost"]: {**r["ratio"], "ms": r["ms"], "cpu": cpu} for r in bench["rows"]}


def study(results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    """The ghost-size table as data: one row per ghost size."""
    results = ablation.load_results(results_dir)
    reruns = claims.load_same_cpu_reruns(results_dir)
    on = study_machine(results)
    by_size = {g: records_on(results, reruns, g, on) for g in ablation.GHOST_SIZES}
    speed = step_ratios(results_dir)
    acc = {
        (g, split): {s: ablation.accuracy(r, split) for s, r in by_size[g].items()}
        for g in ablation.GHOST_SIZES
        for split in ("val", "eval")
    }
    rows = []
    for g in ablation.GHOST_SIZES:
        row: dict[str, Any] = {"ghost": g, "seeds": sorted(by_size[g])}
        for split in ("val", "eval"):
            row[split] = verdicts.mean_interval(acc[g, split])
            diff = verdicts.paired(
                f"ghost {g} against plain batch norm", "0", acc[g, split], acc[PLAIN, split]
            )
            row[f"{split}_vs_plain"] = diff.to_dict() if g != PLAIN else None
        row["commits"] = sorted({r["commit"] for r in by_size[g].values()})
        row["step_time_ratio"] = speed.get(g)
        rows.append(row)
    name = next(claims.cpu_model(r) for runs in by_size.values() for r in runs.values())
    return {"cpu": name, "machine": on, "batch": PLAIN, "rows": rows}


def _mean_ci(stat: dict | None, sign: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    mean = f"{stat['mean']:+.2f}" if sign else f"{stat['mean']:.2f}"
    if stat["ci_low"] is None:
        return mean
    return f"{mean} {claims.interval_cell(stat['ci_low'], stat['ci_high'], sign)}"


def markdown(data: dict[str, Any]) -> str:
    cells = []
    for r in data["rows"]:
        speed = r["step_time_ratio"]
        cells.append(
            [
                "4096 (plain BN)" if r["ghost"] == PLAIN else r["ghost"],
                r["val"]["n"],
                _mean_ci(r["val"]),
                _mean_ci(r["eval"]),
                _mean_ci(r["val_vs_plain"], sign=True),
                _mean_ci(r["eval_vs_plain"], sign=True),
                "-"
                if speed is None
                else "{:.3f} [{:.3f}, {:.3f}]".format(speed["median"], *speed["ci95"]),
            ]
        )
    header = ["ghost size", "n", "val", "test", "val − plain BN", "test − plain BN"]
    header += ["step time / plain BN"]
    new_seed = [
        [
            "4096 (plain BN)" if r["ghost"] == PLAIN else r["ghost"],
            *(
                claims.interval_cell(stat["new_seed_low"], stat["new_seed_high"], sign)
                if stat
                else "-"
                for stat, sign in (
                    (r["val"], False),
                    (r["eval"], False),
                    (r["val_vs_plain"], True),
                    (r["eval_vs_plain"], True),
                )
            ),
        ]
        for r in data["rows"]
    ]
    seeds = ", ".join(map(str, ablation.SELECTION_SEEDS))
    return tables.document(
        "# Ghost size: F1 on Fashion-MNIST, batch 4096, LR 0.566",
        f"Every run: today's default protocol, seeds {seeds}, "
        f"on one CPU model ({data['cpu']}). Accuracies in % (final, 10,000 held-out "
        "training images for val, the test split for test): mean and 95% t interval over "
        "seeds; the differences are paired by seed with plain batch norm (ghost 4096). "
        "Step time: the median per-round ratio of the F1 train step to plain batch norm's "
        "and its 95% interval (experiments/results/bench_ghost_size.md). Built by "
        "`.venv/bin/python -m experiments.paper.ghost_size` from the run records.",
        tables.markdown_table(header, cells),
        "Where one further seed is expected to land: the 95% prediction interval of a "
        "single new draw, mean ± t(n - 1) · s · sqrt(1 + 1/n) (experiments/paper/verdicts.py).",
        tables.markdown_table(
            ["ghost size", "val", "test", "val − plain BN", "test − plain BN"], new_seed
        ),
    )


def plot(data: dict[str, Any], path: Path) -> None:
    """Accuracy against the ghost size (left) and the paired difference to plain BN (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for split, label, shift in (("val", "validation", 0.97), ("eval", "test", 1.03)):
        for ax, key in ((left, split), (right, f"{split}_vs_plain")):
            points = [
                (r["ghost"], r[key]) for r in data["rows"] if r[key] and r[key]["mean"] is not None
            ]
            xs = [g * shift for g, _ in points]
            ys = [s["mean"] for _, s in points]
            # a sample without an interval (one seed) is drawn without error bars
            bounds = [
                (s["ci_low"], s["ci_high"]) if s["ci_low"] is not None else (s["mean"],) * 2
                for _, s in points
            ]
            lows = [y - low for y, (low, _) in zip(ys, bounds, strict=True)]
            highs = [high - y for y, (_, high) in zip(ys, bounds, strict=True)]
            ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, label=label)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ablation.GHOST_SIZES, [str(g) for g in ablation.GHOST_SIZES])
        ax.minorticks_off()
        ax.set_xlabel("ghost batch size (4096 = plain batch norm)")
        ax.legend()
    right.axhline(0.0, color="gray", linewidth=0.8)
    left.set_ylabel("final accuracy (%)")
    right.set_ylabel("minus plain BN, paired (points)")
    fig.suptitle(
        f"F1, Fashion-MNIST, batch 4096, LR 0.566, seeds 0-2 ({data['cpu']}): mean and 95% CI"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    data = study(results_dir)
    text = markdown(data)
    tables.write_outputs(str(results_dir / "ghost_size"), data, text)
    plot(data, results_dir / "ghost_size.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
