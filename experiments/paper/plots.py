"""Reading finished runs and drawing the paper's figures from them.

Shared by `experiments/paper/reproduce_table.py` (Figure 1, the early-stopping figure) and
`experiments/paper/diffusion.py` (the weight-distance figure). Everything here reads what
the trainer writes into a workdir and nothing else:

* ``metrics.jsonl``: one JSON object per line with ``step`` and, as they apply,
  ``epoch``, ``train_loss``, ``weight_distance``, ``eval_loss``, ``eval_accuracy``...
  A resumed run may log a step twice; the later line wins.
* ``summary.json``: written when a run finishes (its presence marks a finished run).
* ``regime.json``: the resolved regime (``steps_per_epoch``, ``total_steps``...).

The functions take plain numbers so that the tests can feed them synthetic workdirs.

References:
  Hoffer, Hubara & Soudry (2017): Figure 1 (validation error against epochs and
  iterations), section 4 and Figure 2 (||w_t - w_0|| grows like log t), and the talk's
  claim that validation error keeps improving while validation loss rises.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Headless: the drivers only write PNG files.
import matplotlib.pyplot as plt
import numpy as np

from gbn_jax.research import analysis
from gbn_jax.trainer.run_files import REGIME_FILE, SUMMARY_FILE

# Display names of the paper's cumulative columns.
COLUMN_LABELS = {
    "sb": "SB",
    "lb": "LB",
    "lb_lr": "+LR",
    "lb_lr_gbn": "+GBN",
    "lb_lr_gbn_ra": "+RA",
}
# Figure 1 stresses SB, the non-adapted LB and the adapted LB; the rest are drawn thin.
COLUMN_STYLE = {
    "sb": dict(color="tab:blue", lw=2.0),
    "lb": dict(color="tab:red", lw=2.0),
    "lb_lr": dict(color="tab:orange", lw=1.0, alpha=0.7),
    "lb_lr_gbn": dict(color="tab:purple", lw=1.0, alpha=0.7),
    "lb_lr_gbn_ra": dict(color="tab:green", lw=2.0),
}


@dataclasses.dataclass
class Run:
    """What one workdir holds.

    Attributes:
      workdir: the run's directory.
      summary: summary.json, or None while the run is unfinished.
      regime: regime.json, or None if absent.
    """

    workdir: str
    summary: dict[str, Any] | None
    regime: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        """True once the trainer wrote summary.json."""
        return self.summary is not None

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (steps, epochs, values) of every logged step that has `key`.

        Reads metrics.jsonl through `gbn_jax.research.analysis.read_metrics` (later lines win
        for steps a resumed run logged twice). Epochs come from the records, else from
        regime.json's ``steps_per_epoch``. Empty arrays when nothing holds `key`.
        """
        try:
            m = analysis.read_metrics(self.workdir, keys=(key,))
        except (FileNotFoundError, ValueError):
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        steps, epochs = m["step"].astype(np.int64), m["epoch"]
        spe = (self.regime or {}).get("steps_per_epoch")
        if spe:
            epochs = np.where(np.isnan(epochs), steps / spe, epochs)
        return steps, epochs, m[key]


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_run(workdir: str) -> Run:
    """Reads summary.json and regime.json of one workdir (metrics are read lazily)."""
    return Run(
        workdir=workdir,
        summary=_read_json(os.path.join(workdir, SUMMARY_FILE)),
        regime=_read_json(os.path.join(workdir, REGIME_FILE)),
    )


def final_eval_accuracy(run: Run) -> float | None:
    """Returns the run's final test accuracy (a fraction in [0, 1]).

    Read from summary.json (``final_eval_accuracy``, or ``final.eval_accuracy``), else
    the last evaluation logged in metrics.jsonl; None when the run has none.
    """
    summary = run.summary or {}
    for key in ("final_eval_accuracy", "eval_accuracy"):
        if isinstance(summary.get(key), int | float):
            return float(summary[key])
    if isinstance(summary.get("final"), Mapping) and "eval_accuracy" in summary["final"]:
        return float(summary["final"]["eval_accuracy"])
    _, _, accuracy = run.series("eval_accuracy")
    return float(accuracy[-1]) if accuracy.size else None


def early_stopping_points(run: Run) -> dict[str, Any] | None:
    """Where validation loss bottoms out and where validation error does.

    The talk's claim: in long runs validation error keeps falling after validation
    loss has started to rise, so early stopping on the loss stops too soon. This
    returns both minima and what stopping at the loss minimum would have cost.

    Args:
      run: a run whose metrics hold eval_loss and eval_accuracy.

    Returns:
      None without evaluations, else a dict: ``min_loss_step``/``min_loss_epoch``/
      ``min_loss`` (first step of the smallest validation loss), ``error_at_min_loss``,
      ``min_error_step``/``min_error_epoch``/``min_error`` (first step of the smallest
      validation error), ``final_step``/``final_error``/``final_loss``,
      ``loss_rise_after_min`` (final loss minus the minimum) and
      ``error_drop_after_min_loss`` (error at the loss minimum minus the final error;
      positive means training on past the loss minimum helped), and
      ``error_falls_while_loss_rises`` (both of the last two positive).
    """
    steps, epochs, loss = run.series("eval_loss")
    acc_steps, _, accuracy = run.series("eval_accuracy")
    if not steps.size or not acc_steps.size:
        return None
    # Keep the steps that have both numbers, in case they were logged apart.
    common, i_loss, i_acc = np.intersect1d(steps, acc_steps, return_indices=True)
    steps, epochs, loss = common, epochs[i_loss], loss[i_loss]
    error = 1.0 - accuracy[i_acc]
    i_min_loss, i_min_error = int(np.argmin(loss)), int(np.argmin(error))
    loss_rise = float(loss[-1] - loss[i_min_loss])
    error_drop = float(error[i_min_loss] - error[-1])
    return dict(
        min_loss_step=int(steps[i_min_loss]),
        min_loss_epoch=float(epochs[i_min_loss]),
        min_loss=float(loss[i_min_loss]),
        error_at_min_loss=float(error[i_min_loss]),
        min_error_step=int(steps[i_min_error]),
        min_error_epoch=float(epochs[i_min_error]),
        min_error=float(error[i_min_error]),
        final_step=int(steps[-1]),
        final_error=float(error[-1]),
        final_loss=float(loss[-1]),
        loss_rise_after_min=loss_rise,
        error_drop_after_min_loss=error_drop,
        error_falls_while_loss_rises=bool(loss_rise > 0 and error_drop > 0),
    )


def _mean_curve(
    runs: Sequence[Run], key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max of `key` over runs, at the steps every run logged."""
    series = [run.series(key) for run in runs]
    steps = series[0][0]
    for s, _, _ in series[1:]:
        steps = np.intersect1d(steps, s)
    epochs = series[0][1][np.isin(series[0][0], steps)]
    values = np.stack([v[np.isin(s, steps)] for s, _, v in series])
    return steps, epochs, values.mean(0), values.min(0), values.max(0)


def plot_validation_error(
    runs_by_column: Mapping[str, Sequence[Run]], path: str, *, title: str = ""
) -> None:
    """Paper Figure 1: validation error against epochs and against iterations.

    One curve per column (the mean over seeds, with the seeds' range shaded when
    there are several). Against epochs the non-adapted large batch lags; against
    iterations the adapted large batch follows the small batch.

    Args:
      runs_by_column: column name (a key of COLUMN_LABELS, or any label) -> its runs.
      path: where to write the PNG.
      title: a figure title (e.g. the dataset, batch sizes and epoch scaling).
    """
    fig, (ax_epochs, ax_steps) = plt.subplots(1, 2, figsize=(11, 4.2))
    for column, runs in runs_by_column.items():
        runs = [r for r in runs if r.series("eval_accuracy")[0].size]
        if not runs:
            continue
        steps, epochs, mean, low, high = _mean_curve(runs, "eval_accuracy")
        style = COLUMN_STYLE.get(column, {})
        label = COLUMN_LABELS.get(column, column)
        for ax, x in ((ax_epochs, epochs), (ax_steps, steps)):
            ax.plot(x, 100 * (1 - mean), label=label, **style)
            if len(runs) > 1:
                ax.fill_between(
                    x, 100 * (1 - high), 100 * (1 - low), color=style.get("color"), alpha=0.15
                )
    ax_epochs.set_xlabel("epochs")
    ax_steps.set_xlabel("iterations (weight updates)")
    ax_steps.set_xscale("log")
    for ax in (ax_epochs, ax_steps):
        ax.set_ylabel("validation error (%)")
        ax.grid(alpha=0.3)
        _clip_error_axis(ax)
    ax_epochs.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)


def _clip_error_axis(ax: Any) -> None:
    """Zooms on the interesting range: the first evaluations are far above the rest."""
    # Curves only: marker lines (axvline) and single points carry no range.
    curves = [line.get_ydata() for line in ax.get_lines() if len(line.get_ydata()) > 2]
    values = np.concatenate(curves) if curves else np.zeros(0)
    if values.size > 4:
        low, high = np.min(values), np.percentile(values, 90)
        ax.set_ylim(max(0.0, low - 0.5), high + 0.5 * (high - low) + 0.5)


def plot_early_stopping(
    runs: Mapping[str, Run], points: Mapping[str, Mapping[str, Any]], path: str, *, title: str = ""
) -> None:
    """Validation error and validation loss against steps for long runs.

    Marks where validation loss bottoms out (dotted) and where validation error does
    (dashed): when the second lies well to the right of the first, early stopping on
    the loss stops too soon.

    Args:
      runs: a label (e.g. "seed 0") -> run.
      points: the same labels -> `early_stopping_points` of the run.
      path: where to write the PNG.
      title: a figure title.
    """
    fig, (ax_error, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, run) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        steps, _, loss = run.series("eval_loss")
        acc_steps, _, accuracy = run.series("eval_accuracy")
        ax_error.plot(acc_steps, 100 * (1 - accuracy), color=color, label=label)
        ax_loss.plot(steps, loss, color=color, label=label)
        p = points.get(label)
        if not p:
            continue
        for ax in (ax_error, ax_loss):
            ax.axvline(p["min_loss_step"], color=color, ls=":", lw=1)
            ax.axvline(p["min_error_step"], color=color, ls="--", lw=1)
        ax_loss.plot(p["min_loss_step"], p["min_loss"], "v", color=color)
        ax_error.plot(p["min_error_step"], 100 * p["min_error"], "^", color=color)
    ax_error.set_ylabel("validation error (%)")
    _clip_error_axis(ax_error)
    ax_loss.set_ylabel("validation loss (cross-entropy)")
    for ax in (ax_error, ax_loss):
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
    ax_loss.legend(title="dotted: min loss, dashed: min error", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)


def plot_weight_distance(
    curves: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    fits: Mapping[int, Mapping[str, Any]],
    path: str,
    *,
    title: str = "",
) -> None:
    """Paper Figure 2: ||w_t - w_0|| against epochs and against iterations (log axis).

    Args:
      curves: batch size -> (steps, epochs, weight distances).
      fits: batch size -> {"log": (a, b), "fit_range": (t_lo, t_hi)} (as written by
        `experiments/paper/diffusion.py`); the fitted a + b*log t is drawn dashed over the
        fitted range on the iterations panel.
      path: where to write the PNG.
      title: a figure title.
    """
    fig, (ax_epochs, ax_steps) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    sizes = sorted(curves)
    for i, batch in enumerate(sizes):
        steps, epochs, distance = curves[batch]
        color = cmap(i / max(1, len(sizes) - 1))
        ax_epochs.plot(epochs, distance, color=color, label=f"B={batch}")
        keep = steps > 0
        ax_steps.plot(steps[keep], distance[keep], color=color, label=f"B={batch}")
        fit = fits.get(batch)
        if fit and fit.get("log") is not None:
            a, b = fit["log"]
            t = np.geomspace(*fit["fit_range"], 50)
            ax_steps.plot(t, a + b * np.log(t), color="k", ls="--", lw=0.8)
    ax_epochs.set_xlabel("epochs")
    ax_steps.set_xlabel("iterations t (log scale)")
    ax_steps.set_xscale("log")
    for ax in (ax_epochs, ax_steps):
        ax.set_ylabel(r"$\|w_t - w_0\|$")
        ax.grid(alpha=0.3)
    ax_epochs.legend(fontsize="small")
    ax_steps.plot([], [], color="k", ls="--", lw=0.8, label="fit a + b log t")
    ax_steps.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)


def save(fig: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
