"""Curve fits for the diffusion analysis: how far do the weights travel from init?

The paper measures the distance d(t) = ||w_t - w_0|| against the number of updates t
and finds d(t) ~ a + b log t ("ultra-slow diffusion") rather than the d ~ sqrt(t) of a
free random walk. This module holds the small numpy fits used to test that claim on the
trainer's logs and on the toy random-walk model (experiments/paper/random_walk.py):

* `fit_log`: d = a + b log t
* `fit_sqrt`: d = a + b sqrt(t)
* `fit_power_law`: y = c x^alpha, a straight line on log-log axes. With x = log t it
  measures the exponent nu of d ~ (log t)^nu, the slope of log d against log log t.
* `fit_log_power`: d = a + b (log t)^p, with p fixed or fitted.

Every fit returns a `CurveFit` with the parameters, their standard errors and R^2.
The standard errors are the ordinary least-squares ones: they assume independent
residuals, which points along one training curve are not (each point is the previous
one plus a step), so read them as a lower bound and prefer a bootstrap over independent
runs or walkers when one is available.

Example:
  >>> import numpy as np
  >>> t = np.arange(1.0, 1001.0)
  >>> fit = fit_log(t, 2.0 + 0.5 * np.log(t))
  >>> print(f"a={fit.params['a']:.3f} b={fit.params['b']:.3f} R^2={fit.r_squared:.3f}")
  a=2.000 b=0.500 R^2=1.000

References:
  Hoffer, Hubara & Soudry (2017), Section 3 ("Theoretical analysis": random walk on a
  random potential, d ~ (log t)^(1/gamma)) and Figure 2 (||w_t - w_0|| against updates).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from gbn_jax.trainer import run_files

__all__ = [
    "CurveFit",
    "fit_log",
    "fit_log_power",
    "fit_power_law",
    "fit_sqrt",
    "read_metrics",
    "select_range",
]

# Golden-section search for the exponent of `fit_log_power`: iterations to shrink the
# bracket by 0.618**60 ~ 3e-13, far below any meaningful exponent resolution.
_GOLDEN_ITERATIONS = 60


@dataclasses.dataclass(frozen=True)
class CurveFit:
    """The result of one least-squares curve fit.

    Attributes:
      model: Which curve was fitted: "log", "sqrt", "power_law" or "log_power".
      params: Fitted parameters by name, e.g. {"a": ..., "b": ...}.
      stderr: Standard error of each parameter (same keys as `params`); nan for a
        parameter that was held fixed.
      r_squared: Coefficient of determination, 1 - SS_res / SS_tot, computed in the
        space the fit minimizes (log-log space for `power_law`).
      num_points: Number of (t, d) points inside the fitting range.
      t_range: (smallest, largest) abscissa actually used.
      predict: Callable evaluating the fitted curve at new abscissae.
    """

    model: str
    params: dict[str, float]
    stderr: dict[str, float]
    r_squared: float
    num_points: int
    t_range: tuple[float, float]
    predict: Callable[[np.ndarray], np.ndarray] = dataclasses.field(repr=False, compare=False)

    def summary(self) -> str:
        """One line: each parameter with its standard error, then R^2 and the range."""
        terms = ", ".join(
            f"{name}={value:.4g}±{self.stderr[name]:.2g}" for name, value in self.params.items()
        )
        low, high = self.t_range
        return f"{self.model}: {terms}, R^2={self.r_squared:.4f}, t in [{low:.4g}, {high:.4g}]"


def select_range(
    t: Sequence[float] | np.ndarray,
    *ys: Sequence[float] | np.ndarray,
    t_min: float | None = None,
    t_max: float | None = None,
    last_decades: float | None = None,
) -> tuple[np.ndarray, ...]:
    """Restricts curves to a fitting range t_min <= t <= t_max.

    Asymptotic laws such as d ~ (log t)^(1/gamma) only hold at late times, so a fit
    should say which range it used. Either give the bounds or `last_decades`, which
    keeps the last that many decades, t >= max(t) / 10**last_decades.

    Args:
      t: Abscissae (e.g. step numbers), one-dimensional.
      *ys: Curves of the same length as `t`, restricted alongside it.
      t_min: Smallest t kept (inclusive); None for no lower bound.
      t_max: Largest t kept (inclusive); None for no upper bound.
      last_decades: Alternative to `t_min`: keep t >= max(t) / 10**last_decades.

    Returns:
      The restricted t followed by each restricted curve, as float64 arrays.

    Raises:
      ValueError: On mismatched shapes, an empty or inverted range, or when both
        `t_min` and `last_decades` are given.
    """
    t = _as_1d("t", t)
    curves = [_as_1d(f"ys[{i}]", y) for i, y in enumerate(ys)]
    for i, y in enumerate(curves):
        if y.shape != t.shape:
            raise ValueError(
                f"ys[{i}] has shape {y.shape} but t has shape {t.shape}; pass curves sampled "
                "at the same points as t."
            )
    if last_decades is not None:
        if t_min is not None:
            raise ValueError(
                f"Got both {t_min=} and {last_decades=}; give one of them to set the lower bound."
            )
        if not last_decades > 0:
            raise ValueError(f"{last_decades=} must be positive (e.g. 2 for the last two decades).")
        if t.size == 0 or not np.max(t) > 0:
            raise ValueError("last_decades needs some positive t; got none.")
        t_min = float(np.max(t)) / 10.0**last_decades
    if t_min is not None and t_max is not None and not t_min < t_max:
        raise ValueError(f"Empty fitting range: {t_min=} must be smaller than {t_max=}.")
    keep = np.ones(t.shape, dtype=bool)
    if t_min is not None:
        keep &= t >= t_min
    if t_max is not None:
        keep &= t <= t_max
    if not keep.any():
        raise ValueError(
            f"No points with {t_min=} <= t <= {t_max=}; the data span "
            f"[{np.min(t) if t.size else 'nan'}, {np.max(t) if t.size else 'nan'}]. "
            "Widen the range."
        )
    return (t[keep], *(y[keep] for y in curves))


def fit_log(
    t: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray,
    *,
    t_min: float | None = None,
    t_max: float | None = None,
) -> CurveFit:
    """Fits d = a + b log t by least squares.

    Args:
      t: Positive abscissae, e.g. the number of weight updates.
      d: Values at t, e.g. ||w_t - w_0||.
      t_min: Optional lower end of the fitting range (inclusive).
      t_max: Optional upper end of the fitting range (inclusive).

    Returns:
      A `CurveFit` with params {"a", "b"}.

    Raises:
      ValueError: If some t <= 0, values are not finite, or fewer than 3 points remain.
    """
    t, d = _prepare(t, d, t_min, t_max, positive_t=True, positive_d=False)
    return _linear_fit("log", t, d, np.log, ("a", "b"))


def fit_sqrt(
    t: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray,
    *,
    t_min: float | None = None,
    t_max: float | None = None,
) -> CurveFit:
    """Fits d = a + b sqrt(t) by least squares (the free random walk law).

    Args:
      t: Non-negative abscissae.
      d: Values at t.
      t_min: Optional lower end of the fitting range (inclusive).
      t_max: Optional upper end of the fitting range (inclusive).

    Returns:
      A `CurveFit` with params {"a", "b"}.

    Raises:
      ValueError: If some t < 0, values are not finite, or fewer than 3 points remain.
    """
    t, d = _prepare(t, d, t_min, t_max, positive_t=False, positive_d=False)
    if np.any(t < 0):
        raise ValueError(f"fit_sqrt needs t >= 0; got min(t)={np.min(t)}. Drop negative times.")
    return _linear_fit("sqrt", t, d, np.sqrt, ("a", "b"))


def fit_power_law(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    x_min: float | None = None,
    x_max: float | None = None,
) -> CurveFit:
    """Fits y = c x^alpha as the straight line log y = log c + alpha log x.

    The exponent alpha is the slope on log-log axes. Pass x = t for the power law of
    d against t (1/2 for free diffusion); pass x = log t for the exponent nu of the
    ultra-slow law d ~ (log t)^nu (the slope of log d against log log t).

    Args:
      x: Positive abscissae.
      y: Positive values at x.
      x_min: Optional lower end of the fitting range (inclusive).
      x_max: Optional upper end of the fitting range (inclusive).

    Returns:
      A `CurveFit` with params {"c", "alpha"}; r_squared is measured in log-log space.
      The standard error of c comes from that of log c by the delta method.

    Raises:
      ValueError: If some x <= 0 or y <= 0, values are not finite, or fewer than 3
        points remain.
    """
    x, y = _prepare(x, y, x_min, x_max, positive_t=True, positive_d=True)
    line = _linear_fit("power_law", np.log(x), np.log(y), lambda u: u, ("log_c", "alpha"))
    c = math.exp(line.params["log_c"])
    alpha = line.params["alpha"]
    return CurveFit(
        model="power_law",
        params={"c": c, "alpha": alpha},
        stderr={"c": c * line.stderr["log_c"], "alpha": line.stderr["alpha"]},
        r_squared=line.r_squared,
        num_points=line.num_points,
        t_range=(float(x[0]), float(x[-1])),
        predict=lambda u: c * np.asarray(u, dtype=np.float64) ** alpha,
    )


def fit_log_power(
    t: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray,
    *,
    exponent: float | None = None,
    exponent_bounds: tuple[float, float] = (0.05, 10.0),
    t_min: float | None = None,
    t_max: float | None = None,
) -> CurveFit:
    """Fits d = a + b (log t)^p, with the exponent p fixed or fitted.

    Unlike `fit_power_law` on (log t, d), the offset a absorbs the distance covered
    before the asymptotic regime sets in. With p free, the fit profiles a and b out
    (linear least squares at each p) and minimizes the residual over p by golden-section
    search inside `exponent_bounds`; the standard errors then come from the Jacobian of
    all three parameters at the optimum (Gauss-Newton covariance).

    Args:
      t: Abscissae, all > 1 so that log t > 0.
      d: Values at t.
      exponent: The exponent p to hold fixed, or None to fit it.
      exponent_bounds: Search interval (low, high) for p when it is fitted.
      t_min: Optional lower end of the fitting range (inclusive).
      t_max: Optional upper end of the fitting range (inclusive).

    Returns:
      A `CurveFit` with params {"a", "b", "p"}; stderr["p"] is nan when p was fixed.

    Raises:
      ValueError: If some t <= 1, values are not finite, the exponent or its bounds
        are not positive, or too few points remain (3 with p fixed, 4 with p free).
    """
    t, d = _prepare(t, d, t_min, t_max, positive_t=True, positive_d=False)
    if np.any(t <= 1):
        raise ValueError(
            f"fit_log_power needs t > 1 so that log t > 0; got min(t)={np.min(t)}. "
            "Pass t_min > 1 or drop the first points."
        )
    log_t = np.log(t)
    if exponent is not None:
        if not exponent > 0:
            raise ValueError(f"{exponent=} must be positive.")
        fit = _linear_fit("log_power", t, d, lambda u: np.log(u) ** exponent, ("a", "b"))
        a, b = fit.params["a"], fit.params["b"]
        return dataclasses.replace(
            fit,
            params={"a": a, "b": b, "p": float(exponent)},
            stderr={**fit.stderr, "p": math.nan},
            predict=lambda u: a + b * np.log(np.asarray(u, dtype=np.float64)) ** exponent,
        )

    low, high = exponent_bounds
    if not 0 < low < high:
        raise ValueError(f"{exponent_bounds=} must satisfy 0 < low < high.")
    if t.size < 4:
        raise ValueError(
            f"Fitting a, b and p needs at least 4 points; got {t.size}. Widen the range "
            "or fix the exponent."
        )

    def residual(p: float) -> float:
        basis = np.stack([np.ones_like(log_t), log_t**p], axis=1)
        coef = np.linalg.lstsq(basis, d, rcond=None)[0]
        return float(np.sum((d - basis @ coef) ** 2))

    # A coarse grid first so that the golden-section search starts in the right basin.
    grid = np.geomspace(low, high, 64)
    best = int(np.argmin([residual(p) for p in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, f2 = residual(x1), residual(x2)
    for _ in range(_GOLDEN_ITERATIONS):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - ratio * (hi - lo)
            f1 = residual(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + ratio * (hi - lo)
            f2 = residual(x2)
    p = float((lo + hi) / 2.0)

    powered = log_t**p
    basis = np.stack([np.ones_like(log_t), powered], axis=1)
    a, b = (float(v) for v in np.linalg.lstsq(basis, d, rcond=None)[0])
    fitted = a + b * powered
    # Jacobian of a + b (log t)^p with respect to (a, b, p).
    jacobian = np.stack([np.ones_like(log_t), powered, b * powered * np.log(log_t)], axis=1)
    stderr = _ols_stderr(jacobian, d - fitted)
    return CurveFit(
        model="log_power",
        params={"a": a, "b": b, "p": p},
        stderr=dict(zip(("a", "b", "p"), stderr, strict=True)),
        r_squared=_r_squared(d, fitted),
        num_points=int(t.size),
        t_range=(float(t[0]), float(t[-1])),
        predict=lambda u: a + b * np.log(np.asarray(u, dtype=np.float64)) ** p,
    )


def read_metrics(
    workdir: str | os.PathLike[str],
    keys: Sequence[str] = ("weight_distance",),
) -> dict[str, np.ndarray]:
    """Reads a trainer workdir's metrics.jsonl into arrays, one entry per step.

    Only lines holding every requested key are used (the trainer writes several kinds
    of line, and e.g. eval lines carry no weight_distance). A run that was resumed from
    a checkpoint logs some steps twice; the later line wins because it belongs to the
    run that continued. A malformed *last* line, as a killed process leaves behind, is
    ignored; a malformed line elsewhere raises.

    Args:
      workdir: The trainer's workdir, or the path of a metrics.jsonl file.
      keys: Metric names to extract besides "step" (and "epoch" when present).

    Returns:
      A dict of float64 arrays sorted by step: "step", "epoch" (nan where a line has
      none) and each requested key.

    Raises:
      FileNotFoundError: If there is no metrics.jsonl.
      run_files.CorruptRunFileError: If a line other than the last is not valid JSON.
      ValueError: If no line holds all of `keys`.
    """
    path = os.fspath(workdir)
    if os.path.isdir(path):
        path = run_files.path(path, run_files.METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No metrics file at {path!r}; pass a trainer workdir that holds metrics.jsonl."
        )
    by_step: dict[int, dict] = {}
    for record in run_files.read_json_lines(path):
        if "step" in record and all(key in record for key in keys):
            by_step[int(record["step"])] = record  # Later lines replace earlier ones.
    if not by_step:
        raise ValueError(
            f"No line of {path!r} holds 'step' and all of {list(keys)}; check the key names "
            "(and that the trainer logged them)."
        )
    steps = sorted(by_step)
    out = {"step": np.asarray(steps, dtype=np.float64)}
    out["epoch"] = np.asarray([by_step[s].get("epoch", math.nan) for s in steps], dtype=np.float64)
    for key in keys:
        out[key] = np.asarray([by_step[s][key] for s in steps], dtype=np.float64)
    return out


# ---------------------------------------------------------------------------------------
# Helpers.


def _as_1d(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional; got shape {array.shape}.")
    return array


def _prepare(
    t: Sequence[float] | np.ndarray,
    d: Sequence[float] | np.ndarray,
    t_min: float | None,
    t_max: float | None,
    *,
    positive_t: bool,
    positive_d: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Validates a curve, restricts it to the range and sorts it by t."""
    t, d = select_range(t, d, t_min=t_min, t_max=t_max)
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(d))):
        raise ValueError("t and d must be finite; drop nan/inf points (e.g. a diverged run).")
    if positive_t and np.any(t <= 0):
        raise ValueError(
            f"This fit takes logarithms of t, so t must be > 0; got min(t)={np.min(t)}. "
            "Drop step 0 or pass t_min > 0."
        )
    if positive_d and np.any(d <= 0):
        raise ValueError(
            f"A power-law fit takes log d, so d must be > 0; got min(d)={np.min(d)}. "
            "Drop the points where d = 0 (e.g. t = 0)."
        )
    if t.size < 3:
        raise ValueError(
            f"A two-parameter fit with standard errors needs at least 3 points; got {t.size}. "
            "Widen the fitting range or log more often."
        )
    order = np.argsort(t, kind="stable")
    return t[order], d[order]


def _linear_fit(
    model: str,
    t: np.ndarray,
    d: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray],
    names: tuple[str, str],
) -> CurveFit:
    """Least squares for d = a + b * transform(t)."""
    u = transform(t)
    if np.ptp(u) == 0:
        raise ValueError(
            f"All {t.size} abscissae are equal (t={t[0]}); a slope needs at least two "
            "distinct t values."
        )
    basis = np.stack([np.ones_like(u), u], axis=1)
    coef = np.linalg.lstsq(basis, d, rcond=None)[0]
    a, b = float(coef[0]), float(coef[1])
    fitted = basis @ coef
    return CurveFit(
        model=model,
        params={names[0]: a, names[1]: b},
        stderr=dict(zip(names, _ols_stderr(basis, d - fitted), strict=True)),
        r_squared=_r_squared(d, fitted),
        num_points=int(t.size),
        t_range=(float(t[0]), float(t[-1])),
        predict=lambda s: a + b * transform(np.asarray(s, dtype=np.float64)),
    )


def _ols_stderr(jacobian: np.ndarray, residuals: np.ndarray) -> list[float]:
    """Standard errors sqrt(diag(s^2 (J^T J)^-1)) with s^2 = RSS / (n - k)."""
    n, k = jacobian.shape
    sigma2 = float(residuals @ residuals) / (n - k)
    covariance = sigma2 * np.linalg.pinv(jacobian.T @ jacobian)
    return [float(math.sqrt(max(v, 0.0))) for v in np.diag(covariance)]


def _r_squared(d: np.ndarray, fitted: np.ndarray) -> float:
    ss_res = float(np.sum((d - fitted) ** 2))
    ss_tot = float(np.sum((d - np.mean(d)) ** 2))
    if ss_tot == 0.0:
        # A constant curve: a perfect fit explains it fully, anything else is undefined.
        return 1.0 if ss_res == 0.0 else math.nan
    return 1.0 - ss_res / ss_tot
