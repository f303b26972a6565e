"""Two explanations of the gap, measured on the headline runs: sharp minima or too few updates.

Keskar et al. (2017) explain the generalization gap by large batches converging to sharp
minima; Hoffer et al. (2017) by the large batch's fewer updates, which regime adaptation
(+RA) restores. McCandlish et al. (2018) put the critical batch size, past which a larger
batch stops saving steps, at the gradient noise scale B_simple = tr(Sigma) / |G|^2.

For every run of the README's headline table (``experiments/paper/ablation.py``: the F1 regime
on Fashion-MNIST, uncompressed, the protocol ``ablation.headline_group()``) whose trainer
workdir is on this machine, this measures the final weights with
``experiments/paper/sharpness.py`` (one subprocess per run, its command recorded so that each
measurement re-runs on its own): the top Hessian eigenvalue of the training loss and
Keskar's epsilon-sharpness at epsilon 1e-3 and 5e-4, on a fixed subset of 1,024 training
images, batch norm in eval mode; and B_simple at the end of training on 8,192 images.
Each result is committed to ``experiments/results/gap_explanations/<run>.json`` as it
lands; finished measurements are skipped. B_simple through training comes from the runs
that logged it (``noise_scale_every=``, ``gbn_jax/trainer/noise_scale.py``), as committed by the
ablation driver; a run of LB, +LR or +GBN that ran without it is trained again with it
(``--noise_reruns``, the seeds of ``--noise_seeds``: the recorded command plus
``noise_scale_every``, which changes nothing else, so the re-run must end with the
committed run's numbers to the last digit, and the report says whether it did).

The report (``experiments/results/gap_explanations.{md,json}`` and
``gap_explanations.png``) puts, per column, the test accuracy and its paired gap to SB
beside the sharpness, the weight distance and B_simple, with the rank correlation of
sharpness and test accuracy over runs.

Usage (from the repository root, after the headline runs):

  .venv/bin/python -m experiments.paper.gap_explanations --commit
  .venv/bin/python -m experiments.paper.gap_explanations --report_only

References:
  Keskar, Mudigere, Nocedal, Smelyanskiy & Tang, ICLR 2017, section 2.2.2;
  McCandlish, Kaplan, Amodei et al., arXiv:1812.06162 (2018), section 2.2, appendix A;
  Hoffer, Hubara & Soudry (2017), sections 1, 3 and 5.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from experiments.harness import launch, provenance, tables
from experiments.harness.provenance import REPO_ROOT, RESULTS_DIR
from experiments.paper import ablation, plots
from gbn_jax.trainer import noise_scale

OUT = "gap_explanations"
MEASURED = RESULTS_DIR / OUT
EPSILONS = ("1e-3", "5e-4")
# The critical batch sizes the paper's F1 row spans: |B_S| and |B_L|.
PAPER_BATCHES = (128, 4096)
# B_simple pooled over the F1 regime's LR phases (epochs; x16 for +RA at ratio 16).
NOISE_PHASES = {"epochs 0-10": (0, 10), "epochs 10-30": (10, 30), "epochs 30-50": (30, 50)}
EPOCHS_SCALE = {"lb_lr_gbn_ra": ablation.RA_BATCH // 128}


def workdir(run: ablation.Planned, runs_dir: Path) -> Path:
    return runs_dir / run.group / run.column / f"seed{run.seed}"


def measure_command(run: ablation.Planned, runs_dir: Path) -> list[str]:
    """The sharpness measurement of one run's final weights, as a command line."""
    path = workdir(run, runs_dir)
    if path.is_absolute() and path.is_relative_to(REPO_ROOT):
        path = path.relative_to(REPO_ROOT)
    return [
        sys.executable,
        "-m",
        "experiments.paper.sharpness",
        str(path),
        "--epsilon",
        *EPSILONS,
        "--out",
        f"{OUT}/{run.name}",
    ]


def noise_rerun(run: ablation.Planned, rerun_dir: Path, commit: bool) -> bool:
    """Trains one run of a column again with B_simple logged; records the curve."""
    from gbn_jax.trainer import regimes

    record = ablation.load_results()[(run.group, run.column, run.seed)]
    every = ablation.NOISE_SCALE_EVERY[run.group].get(
        run.column, ablation.NOISE_SCALE_EVERY_DEFAULT
    )
    arg = f"{record['config_arg']},noise_scale_every={every}"
    workdir = rerun_dir / run.name
    argv = [
        sys.executable,
        "-m",
        "gbn_jax.main",
        f"--config={ablation.CONFIG_FILE}:{arg}",
        f"--workdir={workdir}",
    ]
    config = launch.load_config_module(ablation.CONFIG_FILE).get_config(arg)
    resolved = regimes.resolve(config, 60_000 - ablation.VALIDATION_SIZE)
    with tqdm.tqdm(
        total=resolved.total_steps * resolved.batch_size, unit="img", unit_scale=True
    ) as bar:
        bar.set_description(f"{run.name} + B_simple")
        rc, _ = launch.run_one(
            argv,
            workdir,
            total_steps=resolved.total_steps,
            batch_size=resolved.batch_size,
            bar=bar,
        )
    finished = plots.load_run(str(workdir))
    if rc != 0 or not finished.finished:
        tqdm.tqdm.write(f"{run.name}: the re-run failed (exit {rc}); see {workdir}/train.log")
        return False
    out = ablation.record(run, workdir, argv, provenance.git_commit())
    keys = ("final_val_accuracy", "final_eval_accuracy", "final_train_loss")
    out["same_as_committed"] = {k: out["summary"][k] == record["summary"][k] for k in keys}
    path = MEASURED / f"{run.name}__noise.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    if commit:
        launch.commit_files([path], f"gap_explanations: {run.name} re-run with B_simple")
    return True


def noise_results(group: str) -> dict[tuple[str, int], dict]:
    """(column, seed) -> a result with a noise curve: the ablation's, else a re-run's."""
    out = {}
    for (g, column, seed), result in ablation.load_results().items():
        if g == group and result.get("noise_curve"):
            out[(column, seed)] = result
    for path in sorted(MEASURED.glob(f"{group}__*__noise.json")):
        result = json.loads(path.read_text())
        out.setdefault((result["column"], result["seed"]), result)
    return out


def measure(group: str, runs_dir: Path, commit: bool) -> int:
    """Measures every run of `group` that has a workdir and no committed measurement."""
    results = ablation.load_results()
    todo = []
    for key in sorted(results):
        run = ablation.Planned(*key)
        if run.group != group or (MEASURED / f"{run.name}.json").exists():
            continue
        if not (workdir(run, runs_dir) / "checkpoints").exists():
            tqdm.tqdm.write(f"{run.name}: no workdir under {runs_dir}; re-run its training first")
            continue
        todo.append(run)
    failed = 0
    MEASURED.mkdir(parents=True, exist_ok=True)
    for run in tqdm.tqdm(todo, desc="sharpness", unit="run"):
        argv = measure_command(run, runs_dir)
        rc = subprocess.run(argv, cwd=REPO_ROOT).returncode
        if rc:
            failed += 1
            tqdm.tqdm.write(f"{run.name}: measurement failed (exit {rc})")
            continue
        if commit:
            paths = [MEASURED / f"{run.name}.{ext}" for ext in ("json", "md")]
            launch.commit_files(paths, f"gap_explanations: {run.name}")
    return failed


# ---------------------------------------------------------------------------- report


def _stats(values: Sequence[float]) -> dict[str, Any]:
    mean, std, n = tables.mean_std_n(list(values))
    return dict(mean=mean, std=std, n=n)


def noise_curve(result: dict, points: int = 12) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, B_simple) through training, or None if the run did not log it.

    One measurement's ratio tr(Sigma) / |G|^2 is noisy (|G|^2 can even come out
    negative), so consecutive measurements are pooled into about `points` windows and
    each window's B_simple is the ratio of its sums (McCandlish et al., appendix A).
    """
    curve = result.get("noise_curve")
    if not curve or not curve.get("epoch"):
        return None
    epochs = np.asarray(curve["epoch"], np.float64)
    trace = np.asarray(curve["noise_trace_sigma"], np.float64)
    grad = np.asarray(curve["noise_grad_sq"], np.float64)
    windows = np.array_split(np.arange(epochs.size), min(points, epochs.size))
    # A window whose summed |G|^2 estimate is not positive has no finite B_simple (the
    # gradient is within its noise of zero): left as a gap in the curve.
    value = [
        noise_scale.simple_noise_scale(trace[w], grad[w]) if grad[w].sum() > 0 else np.nan
        for w in windows
    ]
    return np.array([epochs[w].mean() for w in windows]), np.array(value)


def pooled_noise_scale(result: dict, first: float, last: float) -> float | None:
    """B_simple pooled (ratio of sums) over the measurements of epochs [first, last)."""
    curve = result.get("noise_curve")
    if not curve or not curve.get("epoch"):
        return None
    epochs = np.asarray(curve["epoch"], np.float64)
    keep = (epochs >= first) & (epochs < last)
    if not keep.any():
        return None
    trace = np.asarray(curve["noise_trace_sigma"], np.float64)[keep]
    return noise_scale.simple_noise_scale(trace, np.asarray(curve["noise_grad_sq"])[keep])


def collect(group: str) -> dict[str, Any]:
    """Per column of `group`: accuracy, gap, sharpness, distance, noise scale."""
    results = {k: v for k, v in ablation.load_results().items() if k[0] == group}
    per_run, columns = [], {}
    for (_, column, seed), result in sorted(results.items()):
        run = ablation.Planned(group, column, seed)
        path = MEASURED / f"{run.name}.json"
        if not path.exists():
            continue
        measured = json.loads(path.read_text())["runs"][0]
        sb = results.get((group, "sb", seed))
        test = 100 * result["summary"]["final_eval_accuracy"]
        row = dict(
            run=run.name,
            column=column,
            seed=seed,
            test=test,
            gap_to_sb=None if sb is None else test - 100 * sb["summary"]["final_eval_accuracy"],
            train_loss=result["summary"].get("final_train_loss"),
            weight_distance=result["summary"].get("final_weight_distance"),
            lambda_max=measured["hessian"]["eigenvalues"][0],
            phi={str(b["epsilon"]): b["sharpness"] for b in measured["epsilon_sharpness"]},
            b_simple_end=measured["noise_scale"]["b_simple"],
            seconds=measured["wall_time_sec"],
            command=" ".join(["python", *measure_command(run, Path("runs/ablation_f1"))[1:]]),
        )
        per_run.append(row)
        columns.setdefault(column, []).append(row)
    noisy = noise_results(group)
    table = {}
    for column in plots.COLUMN_LABELS:
        phases = {}
        for name, (first, last) in NOISE_PHASES.items():
            values = [
                pooled_noise_scale(
                    r, first * EPOCHS_SCALE.get(column, 1), last * EPOCHS_SCALE.get(column, 1)
                )
                for (c, _), r in noisy.items()
                if c == column
            ]
            phases[name] = _stats([v for v in values if v is not None])
        rows = columns.get(column)
        if not rows:
            if any(v["n"] for v in phases.values()):
                table[column] = {"noise": phases}
            continue
        cell = {
            key: _stats([r[key] for r in rows if r[key] is not None])
            for key in ("test", "gap_to_sb", "lambda_max", "weight_distance", "b_simple_end")
        }
        for eps in rows[0]["phi"]:
            cell[f"phi_{eps}"] = _stats([r["phi"][eps] for r in rows])
        cell["noise"] = phases
        table[column] = cell
    correlation = None
    if len(per_run) >= 3:
        from scipy import stats

        rho, p = stats.spearmanr([r["lambda_max"] for r in per_run], [r["test"] for r in per_run])
        correlation = dict(spearman_rho=float(rho), p_value=float(p), n=len(per_run))
    reruns = []
    for path in sorted(MEASURED.glob(f"{group}__*__noise.json")):
        result = json.loads(path.read_text())
        reruns.append(
            dict(
                name=path.name[: -len("__noise.json")],
                command=result["command"],
                same_as_committed=result["same_as_committed"],
            )
        )
    return dict(
        group=group, noise_reruns=reruns, runs=per_run, table=table, correlation=correlation
    )


def markdown(report: dict[str, Any]) -> str:
    table = report["table"]
    columns = list(table)
    eps_keys = sorted({k for c in columns for k in table[c] if k.startswith("phi_")}, reverse=True)
    lines = [
        "# Sharp minima or too few updates: the headline runs measured",
        "",
        f"F1 on Fashion-MNIST, uncompressed regime, protocol `{report['group']}`; final "
        "weights; mean ± std over seeds (n in the run list). lambda_max: top Hessian "
        "eigenvalue of the training loss (Lanczos, 1,024 training images, batch norm in "
        "eval mode). phi: Keskar's epsilon-sharpness (%, projected ascent, a lower "
        "bound). B_simple at the end: tr(Sigma)/|G|^2 from B_small = 128 and B_big = "
        "8,192 (one subset; noisy where |G|^2 is small).",
    ]
    stats = [
        ("test accuracy (%)", "test", 2, False),
        ("gap to SB (paired, points)", "gap_to_sb", 2, True),
        ("lambda_max", "lambda_max", 1, False),
        *((f"phi, eps = {k[4:]} (%)", k, 2, False) for k in eps_keys),
        ("weight distance ||w - w0||", "weight_distance", 1, False),
        ("B_simple at the end", "b_simple_end", 0, False),
    ]
    empty = dict(mean=None, std=None, n=0)
    rows = [
        [name, *(tables.stat_cell(table[c].get(key, empty), sign, digits) for c in columns)]
        for name, key, digits, sign in stats
    ]
    for phase in NOISE_PHASES:
        cells = []
        for c in columns:
            stat = table[c].get("noise", {}).get(phase, empty)
            cells.append(
                tables.stat_cell(stat, digits=0) + (f" (n={stat['n']})" if stat["n"] else "")
            )
        rows.append([f"B_simple through training, {phase}", *cells])
    lines += [
        "",
        tables.markdown_table(["", *(plots.COLUMN_LABELS[c] for c in columns)], rows),
        "",
        "B_simple through training: the measurements of each run pooled over the F1 "
        "regime's LR phases (ratio of summed tr(Sigma) to summed |G|^2; +RA's epochs "
        f"scaled by {EPOCHS_SCALE['lb_lr_gbn_ra']}), from runs that logged it every N "
        "steps (B_small = 128, or 32 for SB whose batch is 128).",
    ]
    reruns = report.get("noise_reruns", [])
    if reruns:
        lines += ["", "Runs trained again to log B_simple (nothing else changes):", ""]
        for r in reruns:
            same = all(r["same_as_committed"].values())
            lines.append(
                f"- {r['name']}: `{r['command']}`; final validation, test accuracy and "
                "training loss "
                + (
                    "identical to the committed run."
                    if same
                    else f"differ: {r['same_as_committed']}"
                )
            )
    corr = report["correlation"]
    if corr:
        lines += [
            "",
            f"Spearman rank correlation of lambda_max and test accuracy over the {corr['n']} "
            f"runs: rho = {corr['spearman_rho']:+.2f} (p = {corr['p_value']:.2g}).",
        ]
    header = ["run", "test (%)", "lambda_max", *(f"phi {e}" for e in EPSILONS)]
    rows = [
        [
            r["run"],
            f"{r['test']:.2f}",
            f"{r['lambda_max']:.2f}",
            *(f"{v:.2f}" for v in r["phi"].values()),
            f"{r['b_simple_end']:.0f}",
            f"{r['seconds']:.0f}",
        ]
        for r in report["runs"]
    ]
    lines += ["", tables.markdown_table([*header, "B_simple end", "seconds"], rows)]
    lines += ["", "Commands (from the repository root, each re-runs one row):", "", "```"]
    lines += [r["command"] for r in report["runs"]]
    lines += ["```", ""]
    return "\n".join(lines)


def figure(report: dict[str, Any], path: Path) -> None:
    """Left: lambda_max against test accuracy per run. Right: B_simple through training."""
    plt = plots.plt
    fig, (ax_sharp, ax_noise) = plt.subplots(1, 2, figsize=(11, 4.2))
    for column, label in plots.COLUMN_LABELS.items():
        rows = [r for r in report["runs"] if r["column"] == column]
        style = plots.COLUMN_STYLE.get(column, {})
        if rows:
            ax_sharp.scatter(
                [r["lambda_max"] for r in rows],
                [r["test"] for r in rows],
                label=label,
                color=style.get("color"),
            )
    ax_sharp.set_xscale("log")
    ax_sharp.set_xlabel("top Hessian eigenvalue of the training loss (final weights)")
    ax_sharp.set_ylabel("test accuracy (%)")
    ax_sharp.grid(alpha=0.3)
    ax_sharp.legend()
    drawn = set()
    for (column, _), result in sorted(noise_results(report["group"]).items()):
        curve = noise_curve(result)
        if curve is None:
            continue
        style = plots.COLUMN_STYLE.get(column, {})
        label = None if column in drawn else plots.COLUMN_LABELS.get(column, column)
        drawn.add(column)
        # +RA's epochs on the regime's axis (its LR phases are EPOCHS_SCALE times longer).
        x, y = curve
        x = np.asarray(x) / EPOCHS_SCALE.get(column, 1)
        ax_noise.plot(x, y, label=label, color=style.get("color"), lw=1.0, alpha=0.8)
    for batch in PAPER_BATCHES:
        ax_noise.axhline(batch, color="gray", ls="--", lw=0.8)
        ax_noise.annotate(f"B = {batch}", (0, batch), color="gray", va="bottom", fontsize=8)
    ax_noise.set_yscale("log")
    ax_noise.set_xlabel(
        f"epochs of the F1 regime (+RA: its epochs / {EPOCHS_SCALE['lb_lr_gbn_ra']})"
    )
    ax_noise.set_ylabel("B_simple = tr(Sigma) / |G|^2")
    ax_noise.grid(alpha=0.3)
    if drawn:
        ax_noise.legend()
    fig.suptitle("F1 on Fashion-MNIST: sharpness of the final weights and the noise scale")
    fig.tight_layout()
    plots.save(fig, str(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", default=str(REPO_ROOT / "runs" / "ablation_f1"))
    parser.add_argument("--commit", action="store_true", help="git-commit each measurement")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument(
        "--group", default=None, help="protocol (default: the headline's, once chosen)"
    )
    parser.add_argument(
        "--noise_reruns",
        action="store_true",
        help="train the runs of LB, +LR and +GBN that did not log B_simple again, "
        "logging it (seeds of --noise_seeds, in order)",
    )
    parser.add_argument("--noise_seeds", default="0,1,2", help="comma list of seeds")
    parser.add_argument("--rerun_dir", default=str(REPO_ROOT / "runs" / "gap_noise"))
    args = parser.parse_args(argv)
    group = args.group or ablation.headline_group()
    if group not in ablation.PROTOCOLS:
        raise SystemExit(
            f"--group={group} : pass one of {ablation.PROTOCOLS}; by default the headline "
            "protocol, which experiments/paper/ablation.py chooses once its seeds are committed."
        )
    failed = 0
    if args.noise_reruns and not args.report_only:
        have = noise_results(group)
        seeds = [int(s) for s in args.noise_seeds.split(",") if s.strip()]
        for seed in seeds:
            for column in ("lb", "lb_lr", "lb_lr_gbn"):
                if (column, seed) not in have:
                    run = ablation.Planned(group, column, seed)
                    failed += not noise_rerun(run, Path(args.rerun_dir), args.commit)
    if not args.report_only:
        failed += measure(group, Path(args.runs_dir).resolve(), args.commit)
    report = collect(group)
    (RESULTS_DIR / f"{OUT}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS_DIR / f"{OUT}.md").write_text(markdown(report))
    if report["runs"]:
        figure(report, RESULTS_DIR / f"{OUT}.png")
    print(markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
