"""Reproduces the paper's table row for F1: SB, LB, +LR, +GBN, +RA on Fashion-MNIST.

Runs the five cumulative columns of Hoffer et al. (2017), table 1, for Keskar's F1
network through the real trainer CLI (``python -m gbn_jax.main``), one workdir per run
under ``runs/table_<preset>/<column>/seed<k>``, then aggregates the final test
accuracies, writes the table and draws the figures.

Setting (both presets): |B_S| = 128 (the base regime's reference batch), |B_L| = 2048,
ghost batch = |B_S| = 128, so |B_L|/|B_S| = 16 and the +RA run takes 16x the small-batch
epochs. The paper's F1 runs used |B_L| = 4096 (ratio 32); on this 2-core CPU the
ratio-32 +RA run alone would take about as long as the whole ratio-16 sweep, so we keep
the ratio at 16 (at least 16 keeps the comparison meaningful). The base regime is the authors' F1
regime (50 epochs; LR 0.1, x0.1 at epochs 10, 20, 30; momentum 0.9; weight decay 1e-4;
gradient clipping at 5) with its epochs and every LR-drop epoch multiplied by
``epochs_scale`` so that the sweep fits this machine:

======  =====  ============  =========  ==========  ===================================
preset  seeds  epochs_scale  SB epochs  +RA epochs  estimated wall time (idle 2-core CPU)
======  =====  ============  =========  ==========  ===================================
quick   1      0.06          3          48          ~7-9 min, JAX compiles included
full    3      0.08          4          64          ~30-45 min (43 measured)
======  =====  ============  =========  ==========  ===================================

The estimates assume ~5k img/s for SB (batch 128), ~12k img/s for LB (batch 2048),
~15 s of start-up and compilation per run and 30 evaluations of the 10k test images per
run; the +RA runs take well over half of it. A smoke preset (epochs_scale 0.01,
about 2 minutes idle) checks the whole flow and writes under runs/, not results/.

Usage (from the repository root):

  .venv/bin/python -m experiments.paper.reproduce_table --preset quick
  .venv/bin/python -m experiments.paper.reproduce_table --preset full
  .venv/bin/python -m experiments.paper.reproduce_table --preset full --report_only

An interrupted sweep resumes: runs with a summary.json are skipped, unfinished ones are
re-launched with the same command and the trainer resumes them from their checkpoint.

Writes experiments/results/table1_fashion_mnist{,_quick}.{md,json},
figure1_fashion_mnist{,_quick}.png (validation error against epochs and iterations) and
early_stopping_fashion_mnist{,_quick}.png (validation loss and error of the +RA runs).

References:
  Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017: table 1
  (the F1/MNIST row), Figure 1, sections 3-5; the authors' code (eladhoffer/bigBatch)
  for the F1 regime.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from experiments.harness import launch, provenance, tables
from experiments.harness.provenance import REPO_ROOT, RESULTS_DIR
from experiments.paper import plots

CONFIG_FILE = "configs/fashion_mnist_f1.py"
COLUMNS = ("sb", "lb", "lb_lr", "lb_lr_gbn", "lb_lr_gbn_ra")
SMALL_BATCH = 128
LARGE_BATCH = 2048
GHOST_BATCH = 128
# The columns that normalize over ghost batches (the others have no ghost= option).
GHOST_COLUMNS = ("lb_lr_gbn", "lb_lr_gbn_ra")
TEST_EXAMPLES = 10_000  # Fashion-MNIST's test split.
# The paper's F1 row is MNIST (|B_L| = 4096); ours is Fashion-MNIST, so compare the
# gaps to SB, not the absolute accuracies.
PAPER_F1_MNIST = {
    "sb": 98.27,
    "lb": 97.05,
    "lb_lr": 97.55,
    "lb_lr_gbn": 97.60,
    "lb_lr_gbn_ra": 98.53,
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """One sweep size.

    Attributes:
      seeds: the seeds of every column.
      epochs_scale: multiplies the F1 regime's 50 epochs and its LR-drop epochs.
      eval_points: about how many evaluations each run makes (curves for the figures).
      suffix: appended to the output file names.
    """

    seeds: tuple[int, ...]
    epochs_scale: float
    eval_points: int
    suffix: str


# quick: SB trains 3 epochs (LR drops at epochs 0.6, 1.2, 1.8): LB then makes 87 updates
# against SB's 1404, enough for a gap of several points that +RA closes, with a wide
# margin under 15 minutes. full: 4 SB epochs (drops at 0.8, 1.6, 2.4) on three seeds,
# sized to run in about three hours on a 2-core CPU (the 64-epoch +RA
# runs dominate).
PRESETS = {
    "quick": Preset(seeds=(0,), epochs_scale=0.06, eval_points=30, suffix="_quick"),
    "full": Preset(seeds=(0, 1, 2), epochs_scale=0.08, eval_points=30, suffix=""),
    # An end-to-end check of the driver (~2 minutes idle) (SB: half an epoch); its outputs go
    # under the runs directory, not experiments/results.
    "smoke": Preset(seeds=(0,), epochs_scale=0.01, eval_points=10, suffix="_smoke"),
}


def config_arg(column: str, seed: int, preset: Preset, eval_every: int | None = None) -> str:
    """The ``--config`` argument of one run (variant and options)."""
    parts = [column]
    if column != "sb":  # The sb variant trains at the regime's reference batch, 128.
        parts.append(f"batch={LARGE_BATCH}")
    if column in GHOST_COLUMNS:
        parts.append(f"ghost={GHOST_BATCH}")
    parts += [f"epochs_scale={preset.epochs_scale}", f"seed={seed}"]
    if eval_every is not None:
        parts.append(f"eval_every={eval_every}")
    return ",".join(parts)


def plan_run(column: str, seed: int, preset: Preset, num_train: int) -> dict[str, Any]:
    """Resolves one run's regime to size its evaluations and the progress bar.

    Returns:
      A dict with the run's batch size, total steps, epochs, eval cadence and config
      argument.
    """
    from gbn_jax.trainer import regimes  # Imported late: --report_only needs no JAX.

    config = launch.load_config_module(CONFIG_FILE).get_config(config_arg(column, seed, preset))
    resolved = regimes.resolve(config, num_train)
    eval_every = max(1, resolved.total_steps // preset.eval_points)
    return dict(
        column=column,
        seed=seed,
        batch_size=resolved.batch_size,
        total_steps=resolved.total_steps,
        epochs=resolved.epochs,
        eval_every=eval_every,
        arg=config_arg(column, seed, preset, eval_every),
    )


def workdir_of(runs_dir: Path, plan: dict[str, Any]) -> Path:
    """``<runs_dir>/<column>/seed<k>``: one workdir per run."""
    return runs_dir / plan["column"] / f"seed{plan['seed']}"


def command(plan: dict[str, Any], workdir: Path) -> list[str]:
    """The trainer CLI invocation of one run."""
    return [
        sys.executable,
        "-m",
        "gbn_jax.main",
        f"--config={CONFIG_FILE}:{plan['arg']}",
        f"--workdir={workdir}",
    ]


def aggregate(runs: dict[str, dict[int, plots.Run]]) -> dict[str, Any]:
    """Per column: mean and std over seeds of the final test accuracy, and the gaps.

    Args:
      runs: column -> seed -> finished run.

    Returns:
      column -> dict with accuracy (percent) mean/std/per seed, the gap to SB (per seed,
      paired on the seed, and its mean/std), steps, epochs and wall time.
    """
    sb = {s: plots.final_eval_accuracy(r) for s, r in runs.get("sb", {}).items()}
    table = {}
    for column, by_seed in runs.items():
        accuracy = {s: 100 * plots.final_eval_accuracy(r) for s, r in sorted(by_seed.items())}
        gaps = {s: a - 100 * sb[s] for s, a in accuracy.items() if sb.get(s) is not None}
        mean, std, _ = tables.mean_std_n(list(accuracy.values()))
        gap_mean, gap_std, _ = tables.mean_std_n(list(gaps.values()))
        regimes = [r.regime or {} for r in by_seed.values()]
        wall = [launch.wall_time(r.workdir, r.summary) for r in by_seed.values()]
        wall = [w for w in wall if w is not None]
        table[column] = dict(
            label=plots.COLUMN_LABELS.get(column, column),
            accuracy_mean=mean,
            accuracy_std=std,
            accuracy_per_seed={str(s): a for s, a in accuracy.items()},
            gap_to_sb_mean=gap_mean,
            gap_to_sb_std=gap_std,
            gap_to_sb_per_seed={str(s): g for s, g in gaps.items()},
            num_seeds=len(accuracy),
            batch_size=regimes[0].get("batch_size"),
            steps=regimes[0].get("total_steps"),
            epochs=regimes[0].get("epochs"),
            lr_boundaries=regimes[0].get("lr_boundaries"),
            wall_time_s_mean=float(np.mean(wall)) if wall else None,
            wall_time_s_total=float(np.sum(wall)) if wall else None,
        )
    return table


def markdown(result: dict[str, Any]) -> str:
    """The table as markdown: ours next to the paper's F1/MNIST row, then details."""
    table, columns = result["columns"], [c for c in COLUMNS if c in result["columns"]]
    n = max((table[c]["num_seeds"] for c in columns), default=0)
    header = ["", *(plots.COLUMN_LABELS[c] for c in columns)]
    sb_paper = PAPER_F1_MNIST["sb"]
    rows = [
        ["ours: accuracy"]
        + [tables.cell(table[c]["accuracy_mean"], table[c]["accuracy_std"]) for c in columns],
        ["ours: gap to SB"]
        + [
            tables.cell(table[c]["gap_to_sb_mean"], table[c]["gap_to_sb_std"], True)
            for c in columns
        ],
        ["paper (MNIST): accuracy", *(f"{PAPER_F1_MNIST[c]:.2f}" for c in columns)],
        ["paper (MNIST): gap to SB", *(f"{PAPER_F1_MNIST[c] - sb_paper:+.2f}" for c in columns)],
        ["batch size", *(table[c]["batch_size"] for c in columns)],
        ["steps", *(table[c]["steps"] for c in columns)],
        ["epochs", *(tables.cell(table[c]["epochs"]) for c in columns)],
        ["wall time per run (s)", *(tables.cell(table[c]["wall_time_s_mean"]) for c in columns)],
    ]
    seeds = sorted({s for c in columns for s in table[c]["accuracy_per_seed"]}, key=int)
    per_seed = [
        [f"seed {s}", *(tables.cell(table[c]["accuracy_per_seed"].get(s)) for c in columns)]
        for s in seeds
    ]
    lines = [
        f"# Table 1, F1 row: Fashion-MNIST on this machine ({result['preset']} preset, "
        f"regime COMPRESSED x{result['setting']['epochs_scale']})",
        "",
        "Compressed in time, the large-LR columns get too few updates to recover from their "
        "first steps; the uncompressed runs are in experiments/results/ablation_f1.md.",
        "",
        f"Final test accuracy (%), mean ± std over {n} seed(s) (std: ddof=1); gap = column "
        "minus SB, paired by seed. The paper's row is MNIST with |B_L| = 4096: compare "
        "gaps, not absolute accuracies.",
        "",
        tables.markdown_table(header, rows),
        "",
        "Per seed (accuracy %):",
        "",
        tables.markdown_table(header, per_seed),
    ]
    setting = result["setting"]
    lines += [
        "",
        "## Setting",
        "",
        f"- Data: Fashion-MNIST (60k train / 10k test), model F1 (784 -> 5 x [Dense 512, "
        f"BN, ReLU] -> 10). |B_S| = {SMALL_BATCH}, |B_L| = {LARGE_BATCH} (ratio 16; the paper "
        f"used 4096, too slow for +RA on this CPU), ghost batch = {GHOST_BATCH}.",
        f"- Regime: the authors' F1 regime (50 epochs, LR 0.1 x0.1 at epochs 10/20/30, "
        f"momentum 0.9, wd 1e-4, clip 5) with epochs and LR-drop epochs scaled by "
        f"epochs_scale = {setting['epochs_scale']} "
        f"(SB: {tables.cell(table.get('sb', {}).get('epochs'))} epochs). "
        "+LR: LR x sqrt(16) = 0.4; +RA: 16x the epochs, drops at the SB steps.",
        f"- Hardware: {result['hardware']['cpu']} ({result['hardware']['cpu_count']} cores), "
        f"jax {result['hardware']['versions']['jax']}; date {result['date']}; sweep wall time "
        f"{tables.cell(result['total_wall_time_s'])} s (sum of runs).",
    ]
    stops = result.get("early_stopping", {}).get("lb_lr_gbn_ra", {})
    if stops:
        lines += ["", "## Early stopping on validation loss (+RA runs)", ""]
        for s, p in stops.items():
            lines.append(
                f"- seed {s}: validation loss bottoms at step {p['min_loss_step']} "
                f"(error {100 * p['error_at_min_loss']:.2f}%), validation error at step "
                f"{p['min_error_step']} ({100 * p['min_error']:.2f}%); the loss then rises by "
                f"{p['loss_rise_after_min']:.3f} while the error falls by "
                f"{100 * p['error_drop_after_min_loss']:.2f} points to the end (binomial "
                f"noise of one error on {TEST_EXAMPLES} test images: "
                f"{100 * math.sqrt(p['final_error'] * (1 - p['final_error']) / TEST_EXAMPLES):.2f}"
                " points, 1 s.d.)."
            )
    lines += ["", "## Commands", "", "```"]
    lines += [c for column in columns for c in result["commands"].get(column, [])]
    lines += ["```", ""]
    return "\n".join(lines)


def report(runs_dir: Path, preset_name: str, preset: Preset, out_dir: Path) -> dict[str, Any]:
    """Aggregates the finished runs under `runs_dir`, writes table, JSON and figures.

    Args:
      runs_dir: holds ``<column>/seed<k>`` workdirs.
      preset_name: recorded in the outputs.
      preset: the sweep setting.
      out_dir: where the .md, .json and .png files go.

    Returns:
      The JSON-able result.
    """
    runs: dict[str, dict[int, plots.Run]] = {}
    commands: dict[str, list[str]] = {}
    for column in COLUMNS:
        for seed in preset.seeds:
            workdir = workdir_of(runs_dir, dict(column=column, seed=seed))
            run = plots.load_run(str(workdir))
            if not run.finished:
                continue
            runs.setdefault(column, {})[seed] = run
            record = workdir / launch.COMMAND_FILE
            if record.exists():
                commands.setdefault(column, []).append(record.read_text().strip())
    early_stopping = {
        column: {str(s): plots.early_stopping_points(r) for s, r in by_seed.items()}
        for column, by_seed in runs.items()
    }
    table = aggregate(runs)
    total_wall = sum(c["wall_time_s_total"] or 0.0 for c in table.values())
    result = dict(
        preset=preset_name,
        dataset="fashion_mnist",
        model="f1",
        setting=dict(
            small_batch=SMALL_BATCH,
            large_batch=LARGE_BATCH,
            ghost_batch_size=GHOST_BATCH,
            ratio=LARGE_BATCH // SMALL_BATCH,
            paper_large_batch=4096,
            large_batch_note=(
                "The paper's F1 runs used |B_L| = 4096; 2048 (ratio 16) keeps the +RA runs "
                "within this 2-core CPU's budget."
            ),
            epochs_scale=preset.epochs_scale,
            epochs_scale_note=(
                "The F1 regime's 50 epochs and its LR drops (epochs 10, 20, 30) are all "
                "multiplied by epochs_scale; +RA multiplies the result by 16."
            ),
            base_regime="f1: 50 epochs, lr 0.1 x0.1 at 10/20/30, momentum 0.9, wd 1e-4, clip 5",
            seeds=list(preset.seeds),
            config_file=CONFIG_FILE,
        ),
        paper_f1_mnist=PAPER_F1_MNIST,
        columns=table,
        early_stopping=early_stopping,
        commands=commands,
        **provenance.provenance(
            {
                f"{column}/seed{seed}": launch.resolved_config(run.workdir)
                for column, by_seed in runs.items()
                for seed, run in by_seed.items()
            }
        ),
        total_wall_time_s=total_wall,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"table1_fashion_mnist{preset.suffix}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(result))
    title = (
        f"F1 on Fashion-MNIST, |B_S|={SMALL_BATCH}, |B_L|={LARGE_BATCH}, "
        f"epochs x{preset.epochs_scale} ({preset_name})"
    )
    by_column = {c: list(runs[c].values()) for c in COLUMNS if c in runs}
    if by_column:
        plots.plot_validation_error(
            by_column, str(out_dir / f"figure1_fashion_mnist{preset.suffix}.png"), title=title
        )
    if "lb_lr_gbn_ra" in runs:
        ra = {f"seed {s}": r for s, r in runs["lb_lr_gbn_ra"].items()}
        points = {f"seed {s}": p for s, p in early_stopping["lb_lr_gbn_ra"].items() if p}
        plots.plot_early_stopping(
            ra,
            points,
            str(out_dir / f"early_stopping_fashion_mnist{preset.suffix}.png"),
            title=f"+RA runs (LB + LR + GBN + RA): {title}",
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument(
        "--runs_dir", default=None, help="where the workdirs go (default runs/table_<preset>)"
    )
    parser.add_argument(
        "--out_dir",
        default=None,
        help="where tables and figures go (default experiments/results; smoke: <runs_dir>/results)",
    )
    parser.add_argument(
        "--report_only", action="store_true", help="aggregate finished runs, train nothing"
    )
    parser.add_argument(
        "--show_trainer_output",
        action="store_true",
        help="stream the trainer's output (default: into <workdir>/train.log)",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    runs_dir = Path(args.runs_dir or REPO_ROOT / "runs" / f"table_{args.preset}")
    out_dir = Path(
        args.out_dir or (runs_dir / "results" if args.preset == "smoke" else RESULTS_DIR)
    )

    failed = []
    if not args.report_only:
        from gbn_jax.trainer import input_pipeline

        num_train = input_pipeline.get_dataset_info("fashion_mnist").num_train
        # Seed-major order: an interrupted full sweep leaves whole seeds behind.
        plans = [plan_run(c, s, preset, num_train) for s in preset.seeds for c in COLUMNS]
        todo = [p for p in plans if not plots.load_run(str(workdir_of(runs_dir, p))).finished]
        print(
            f"{len(plans) - len(todo)} of {len(plans)} runs already finished in {runs_dir}; "
            f"{len(todo)} to go (epochs_scale={preset.epochs_scale}, seeds={preset.seeds})."
        )
        total = sum(p["total_steps"] * p["batch_size"] for p in todo)
        with tqdm.tqdm(total=total, unit="img", unit_scale=True, smoothing=0.05) as bar:
            for plan in todo:
                workdir = workdir_of(runs_dir, plan)
                bar.set_description(f"{plots.COLUMN_LABELS[plan['column']]} seed {plan['seed']}")
                rc, seconds = launch.run_one(
                    command(plan, workdir),
                    workdir,
                    total_steps=plan["total_steps"],
                    batch_size=plan["batch_size"],
                    bar=bar,
                    show_output=args.show_trainer_output,
                )
                run = plots.load_run(str(workdir))
                if rc != 0 or not run.finished:
                    failed.append(workdir)
                    tqdm.tqdm.write(f"FAILED (exit {rc}) {workdir}; see {workdir / 'train.log'}")
                    continue
                accuracy = plots.final_eval_accuracy(run)
                tqdm.tqdm.write(
                    f"{plan['column']:>13s} seed {plan['seed']}: test accuracy "
                    f"{100 * accuracy:.2f}% after {plan['total_steps']} steps "
                    f"({plan['epochs']:.1f} epochs) in {seconds:.0f} s"
                )
        if failed:
            print(f"{len(failed)} run(s) failed; re-run the same command to retry them.")

    result = report(runs_dir, args.preset, preset, out_dir)
    print()
    print(markdown(result).split("\n## Setting")[0])
    print(f"Wrote {out_dir}/table1_fashion_mnist{preset.suffix}.{{md,json}} and figures.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
