"""How far the weights travel: ||w_t - w_0|| against updates for six batch sizes.

The paper's section 3 / Figure 2 claim: during the initial high-learning-rate phase
the distance from initialization grows like log t in the number of updates t, for
every batch size ("ultra-slow diffusion", a random walk on a random potential), not
like the sqrt(t) of a free random walk; against epochs the curves of different batch
sizes separate, because a larger batch makes fewer updates per epoch.

Setting: F1 on Fashion-MNIST with plain batch norm, batch sizes 64, 128, 256, 512,
1024 and 2048, a constant learning rate (no drops: the regime's schedule is overridden
by the single pair (0, 0.1)) scaled as lr = 0.1 * sqrt(B / 128) (the paper's +LR rule,
the ``lb_lr`` variant), momentum 0.9, weight decay 1e-4, clipping at 5, the same
number of epochs for every batch size (default 5), seed 0, and ``log_schedule="log"``
so the trainer logs ~20 log-spaced steps per decade besides every 50 steps. Each run
goes through the trainer CLI into ``runs/diffusion/b<B>``; finished runs are skipped,
unfinished ones resumed.

Fits (``gbn_jax.research.analysis``), per batch size, over t >= ``--t_min`` (default 10)
updates up to the end of the run: d = a + b log t and d = a + b sqrt(t), each with
R^2, and the power law d = c t^alpha for its exponent. The first few updates are left
out because the distance first grows nearly linearly (the momentum builds up and the
steps are still large) before the diffusive regime sets in.

Usage (from the repository root; about 6-8 minutes on this project's idle 2-core CPU):

  .venv/bin/python -m experiments.paper.diffusion
  .venv/bin/python -m experiments.paper.diffusion --report_only   # refit finished runs

Writes experiments/results/diffusion.{md,json} and weight_distance.png.

References:
  Hoffer, Hubara & Soudry (2017), section 3 ("random walk on a random potential") and
  Figure 2 (||w_t - w_0|| against iterations, log axis).
"""

from __future__ import annotations

import argparse
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
from gbn_jax.research import analysis

CONFIG_FILE = "configs/fashion_mnist_f1.py"
BATCH_SIZES = (64, 128, 256, 512, 1024, 2048)
REFERENCE_BATCH = 128
BASE_LR = 0.1


# How the constant LR depends on the batch: the paper's +LR rule, or one LR for all.
LR_RULES = {
    "sqrt": ("lb_lr", "lr = 0.1 sqrt(B/128)"),
    "same": ("lb", "lr = 0.1 for every B"),
}


def learning_rate(batch_size: int, lr_rule: str = "sqrt") -> float:
    """The constant LR of a batch size under ``lr_rule`` ("sqrt" or "same")."""
    return BASE_LR * (math.sqrt(batch_size / REFERENCE_BATCH) if lr_rule == "sqrt" else 1.0)


def command(
    batch_size: int, epochs: float, seed: int, workdir: Path, lr_rule: str = "sqrt"
) -> list[str]:
    """The trainer CLI invocation of one constant-LR run."""
    # lb_lr scales the LR by sqrt(B/128), lb keeps it; both use plain batch norm and no
    # regime adaptation. Evaluating once, at the end, keeps the runs short; the weight
    # distance is logged at every log step.
    variant = LR_RULES[lr_rule][0]
    arg = f"{variant},batch={batch_size},seed={seed},eval_every=1000000000"
    return [
        sys.executable,
        "-m",
        "gbn_jax.main",
        f"--config={CONFIG_FILE}:{arg}",
        f"--workdir={workdir}",
        f"--config.regime.lr_schedule=(({0.0}, {BASE_LR}),)",
        f"--config.regime.epochs={float(epochs)}",
        "--config.log_schedule=log",
    ]


def fit_curve(steps: np.ndarray, distance: np.ndarray, t_min: float) -> dict[str, Any]:
    """Fits d = a + b log t, d = a + b sqrt t and d = c t^alpha over t >= t_min.

    Args:
      steps: update counts t.
      distance: ||w_t - w_0|| at those counts.
      t_min: the smallest t fitted.

    Returns:
      A JSON-able dict: ``fit_range`` (t_lo, t_hi actually used), ``num_points``, and
      per model ("log", "sqrt", "power_law") its params, standard errors and R^2; plus
      ``log_beats_sqrt`` (R^2 of the log fit above that of the sqrt fit).
    """
    t = steps.astype(np.float64)
    fits = {
        "log": analysis.fit_log(t, distance, t_min=t_min),
        "sqrt": analysis.fit_sqrt(t, distance, t_min=t_min),
        "power_law": analysis.fit_power_law(t, distance, x_min=t_min),
    }
    out: dict[str, Any] = {
        "fit_range": list(fits["log"].t_range),
        "num_points": fits["log"].num_points,
    }
    for name, fit in fits.items():
        out[name] = dict(params=fit.params, stderr=fit.stderr, r_squared=fit.r_squared)
    out["log_beats_sqrt"] = bool(fits["log"].r_squared > fits["sqrt"].r_squared)
    return out


def analyze(
    runs: dict[int, plots.Run], *, t_min: float
) -> tuple[dict[int, dict[str, Any]], dict[int, tuple]]:
    """Fits every finished run's weight-distance curve.

    Args:
      runs: batch size -> run.
      t_min: smallest number of updates fitted.

    Returns:
      (batch size -> row of the table, batch size -> (steps, epochs, distance)).
    """
    rows, curves = {}, {}
    for batch, run in sorted(runs.items()):
        steps, epochs, distance = run.series("weight_distance")
        curves[batch] = (steps, epochs, distance)
        try:
            fit = fit_curve(steps, distance, t_min)
        except ValueError as error:  # Too few points past t_min (a very short run).
            fit = dict(fit_error=str(error), fit_range=None, num_points=0, log_beats_sqrt=None)
            fit.update(log=None, sqrt=None, power_law=None)
        regime = run.regime or {}
        rows[batch] = dict(
            batch_size=batch,
            # The LR the trainer actually used (lr_boundaries[0] = [0, lr]).
            learning_rate=(regime.get("lr_boundaries") or [[0, float("nan")]])[0][1],
            epochs=regime.get("epochs"),
            steps=int(steps[-1]),
            final_distance=float(distance[-1]),
            wall_time_s=launch.wall_time(run.workdir, run.summary),
            examples_per_sec=(run.summary or {}).get("examples_per_sec"),
            final_eval_accuracy=plots.final_eval_accuracy(run),
            **fit,
        )
    return rows, curves


FIT_HEADER = (
    *("B", "lr", "epochs", "steps", "fit range t", "final d", "a + b log t: b", "R^2 (log)"),
    *("a + b sqrt t: b", "R^2 (sqrt)", "c t^alpha: alpha", "wall (s)"),
)


def markdown(result: dict[str, Any]) -> str:
    """The fit table as markdown."""
    lines = [
        "# Weight distance ||w_t - w_0|| in the constant-learning-rate phase",
        "",
        f"F1 on Fashion-MNIST, plain batch norm, {result['lr_rule']}, "
        f"the same number of epochs for every batch size, seed {result['seed']}. Fits over "
        f"t >= {result['t_min']} updates to the end of each run (OLS; the standard errors "
        "assume independent residuals, which points of one curve are not: read them as "
        "lower bounds).",
    ]
    rows = []
    for row in result["rows"].values():
        log, sqrt, power = row["log"], row["sqrt"], row["power_law"]
        wall = row["wall_time_s"]
        cells = [
            str(row["batch_size"]),
            f"{row['learning_rate']:.4f}",
            f"{row['epochs']:.2f}",
            str(row["steps"]),
            "-" if row["fit_range"] is None else "{:.0f}-{:.0f}".format(*row["fit_range"]),
            f"{row['final_distance']:.2f}",
        ]
        if log is None:
            cells += ["(too few points to fit)", "-", "-", "-", "-"]
        else:
            cells += [
                f"{log['params']['b']:.3f} ± {log['stderr']['b']:.3f}",
                f"{log['r_squared']:.4f}",
                f"{sqrt['params']['b']:.4f} ± {sqrt['stderr']['b']:.4f}",
                f"{sqrt['r_squared']:.4f}",
                f"{power['params']['alpha']:.3f} ± {power['stderr']['alpha']:.3f}",
            ]
        cells.append("-" if wall is None else f"{wall:.0f}")
        rows.append(cells)
    lines += ["", tables.markdown_table(FIT_HEADER, rows)]
    fitted = [row for row in result["rows"].values() if row["log"] is not None]
    wins = sum(row["log_beats_sqrt"] for row in fitted)
    hw = result["hardware"]
    lines += [
        "",
        f"a + b log t fits better than a + b sqrt t (higher R^2) for {wins} of "
        f"{len(fitted)} fitted batch sizes.",
        "",
        f"Hardware: {hw['cpu']} ({hw['cpu_count']} cores), jax {hw['versions']['jax']}; "
        f"date {result['date']}; total wall time {result['total_wall_time_s']:.0f} s.",
        "",
        "Commands:",
        "",
        "```",
        *result["commands"],
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=5.0, help="epochs per batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--t_min", type=float, default=10.0, help="smallest t fitted")
    parser.add_argument(
        "--batch_sizes", default=",".join(map(str, BATCH_SIZES)), help="comma-separated"
    )
    parser.add_argument(
        "--lr_rule",
        choices=sorted(LR_RULES),
        default="sqrt",
        help="sqrt: lr = 0.1 sqrt(B/128) (the paper's +LR); same: lr = 0.1 for every B",
    )
    parser.add_argument("--runs_dir", default=None, help="default runs/diffusion[_<rule>]")
    parser.add_argument("--out_dir", default=str(RESULTS_DIR))
    parser.add_argument("--report_only", action="store_true", help="refit, train nothing")
    parser.add_argument("--show_trainer_output", action="store_true")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    # The sqrt rule keeps the original output names; other rules get a suffix.
    suffix = "" if args.lr_rule == "sqrt" else f"_{args.lr_rule}_lr"
    default_runs = REPO_ROOT / "runs" / ("diffusion" + suffix)
    runs_dir, out_dir = Path(args.runs_dir or default_runs), Path(args.out_dir)

    def workdir_of(batch: int) -> Path:
        return runs_dir / f"b{batch}"

    failed = []
    if not args.report_only:
        from gbn_jax.trainer import input_pipeline

        num_train = input_pipeline.get_dataset_info("fashion_mnist").num_train
        todo = [b for b in batch_sizes if not plots.load_run(str(workdir_of(b))).finished]
        total_steps = {b: int(args.epochs * (num_train // b)) for b in todo}
        with tqdm.tqdm(
            total=sum(total_steps[b] * b for b in todo), unit="img", unit_scale=True
        ) as bar:
            for batch in todo:
                bar.set_description(f"B={batch}")
                workdir = workdir_of(batch)
                rc, seconds = launch.run_one(
                    command(batch, args.epochs, args.seed, workdir, args.lr_rule),
                    workdir,
                    total_steps=total_steps[batch],
                    batch_size=batch,
                    bar=bar,
                    show_output=args.show_trainer_output,
                )
                if rc != 0 or not plots.load_run(str(workdir)).finished:
                    failed.append(batch)
                    tqdm.tqdm.write(f"FAILED (exit {rc}): {workdir}; see its train.log")
                else:
                    tqdm.tqdm.write(f"B={batch}: {total_steps[batch]} steps in {seconds:.0f} s")

    runs = {b: plots.load_run(str(workdir_of(b))) for b in batch_sizes}
    runs = {b: r for b, r in runs.items() if r.finished}
    rows, curves = analyze(runs, t_min=args.t_min)
    commands = []
    for batch in runs:
        record = workdir_of(batch) / "driver_command.txt"
        if record.exists():
            commands.append(record.read_text().strip())
    result = dict(
        claim="||w_t - w_0|| ~ a + b log t in the constant-LR phase (paper section 3)",
        dataset="fashion_mnist",
        model="f1",
        norm="batch",
        lr_rule=LR_RULES[args.lr_rule][1] + ", constant (no drops)",
        epochs=args.epochs,
        seed=args.seed,
        t_min=args.t_min,
        rows={str(b): row for b, row in rows.items()},
        commands=commands,
        **provenance.provenance(
            {str(b): launch.resolved_config(r.workdir) for b, r in runs.items()}
        ),
        total_wall_time_s=float(sum(row["wall_time_s"] or 0.0 for row in rows.values())),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"diffusion{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"diffusion{suffix}.md").write_text(markdown(result))
    fits = {
        b: {"log": (r["log"]["params"]["a"], r["log"]["params"]["b"]), "fit_range": r["fit_range"]}
        for b, r in rows.items()
        if r["log"] is not None
    }
    plots.plot_weight_distance(
        curves,
        fits,
        str(out_dir / f"weight_distance{suffix}.png"),
        title=f"F1 / Fashion-MNIST, constant {LR_RULES[args.lr_rule][1]}, {args.epochs:g} epochs",
    )
    print(markdown(result))
    if failed:
        print(f"{len(failed)} run(s) failed ({failed}); re-run the same command to retry.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
