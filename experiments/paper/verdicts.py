"""The rule by which every claimed difference between two columns gets its verdict.

A claim says that a treatment changes accuracy in one direction against a control
("+GBN beats +LR at batch 4096 and LR 0.566"). Its evidence is the runs of both with
the same seeds: the differences d_s = treatment_s - control_s, paired by seed, and the
two-sided 95% confidence interval of their mean from Student's t with n - 1 degrees of
freedom (``scipy.stats.ttest_1samp``). The verdict:

* ``holds``: the interval excludes 0 on the claimed side;
* ``contradicted``: it excludes 0 on the other side;
* ``undetermined``: it contains 0, or there are fewer than two pairs.

A claim of no effect (direction "0": "keep_last_batch does nothing measurable") cannot
hold by this rule: it is ``contradicted`` when the interval excludes 0 on either side,
``undetermined`` otherwise.

The confidence interval is about the mean over seeds. Where one more seed's own result
will fall is a wider range, the 95% prediction interval of a single new draw from the
same normal population: mean ± t(n - 1) · s · sqrt(1 + 1/n). It is reported beside the
confidence interval and plays no part in the verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
Direction = Literal["+", "-", "0"]
Verdict = Literal["holds", "contradicted", "undetermined"]


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """The paired differences of two sets of runs and the verdict on one claim."""

    claim: str
    direction: Direction
    per_seed: dict[int, float]
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    verdict: Verdict
    new_seed_low: float | None = None
    new_seed_high: float | None = None

    @property
    def n(self) -> int:
        return len(self.per_seed)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["per_seed"] = {str(k): v for k, v in self.per_seed.items()}
        out["n"] = self.n
        return out


def confidence_interval(values: np.ndarray) -> tuple[float, float] | tuple[None, None]:
    """The 95% t interval of the mean of `values`; (None, None) for fewer than two, or
    when they are all equal (zero sample variance: the t interval is undefined, and
    accuracies on 10,000 images move in steps of 0.01 points, so two seeds can tie)."""
    if values.size < 2 or np.all(values == values[0]):
        return None, None
    interval = scipy.stats.ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE)
    return float(interval.low), float(interval.high)


def prediction_interval(values: np.ndarray) -> tuple[float, float] | tuple[None, None]:
    """The 95% interval in which one new seed's value falls (normal model): the
    confidence interval of the mean widened by sqrt(n + 1) about the mean."""
    low, high = confidence_interval(values)
    if low is None:
        return None, None
    half = (high - low) / 2 * np.sqrt(values.size + 1.0)
    return float(values.mean() - half), float(values.mean() + half)


def verdict(direction: Direction, low: float | None, high: float | None) -> Verdict:
    """The rule above, for an interval [low, high] of treatment minus control."""
    if direction not in ("+", "-", "0"):
        raise ValueError(f"{direction=} must be '+', '-' or '0' (no effect claimed).")
    if low is None or high is None:
        return "undetermined"
    excludes_zero_above, excludes_zero_below = low > 0, high < 0
    if direction == "0":
        return "contradicted" if excludes_zero_above or excludes_zero_below else "undetermined"
    claimed, other = (
        (excludes_zero_above, excludes_zero_below)
        if direction == "+"
        else (excludes_zero_below, excludes_zero_above)
    )
    if claimed:
        return "holds"
    if other:
        return "contradicted"
    return "undetermined"


def paired(
    claim: str,
    direction: Direction,
    treatment: Mapping[int, float],
    control: Mapping[int, float],
) -> PairedDifference:
    """Differences treatment - control over the seeds both have, and their verdict.

    Args:
      claim: what is claimed, in words.
      direction: "+" if the claim is treatment > control, "-" if below, "0" for no effect.
      treatment: seed -> accuracy (or any score) of the treatment runs.
      control: seed -> the same score of the control runs.

    Returns:
      The per-seed differences, their mean, sample std (ddof=1), 95% CI and verdict.
    """
    seeds = sorted(set(treatment) & set(control))
    per_seed = {s: float(treatment[s]) - float(control[s]) for s in seeds}
    values = np.asarray(list(per_seed.values()), np.float64)
    low, high = confidence_interval(values)
    new_low, new_high = prediction_interval(values)
    return PairedDifference(
        claim=claim,
        direction=direction,
        per_seed=per_seed,
        mean=float(values.mean()) if values.size else None,
        std=float(values.std(ddof=1)) if values.size > 1 else None,
        ci_low=low,
        ci_high=high,
        verdict=verdict(direction, low, high),
        new_seed_low=new_low,
        new_seed_high=new_high,
    )


def mean_interval(values: Mapping[int, float]) -> dict:
    """Mean, sample std, 95% t interval of the mean and 95% prediction interval of one
    new seed, for one column's accuracies over seeds."""
    a = np.asarray(list(values.values()), np.float64)
    low, high = confidence_interval(a)
    new_low, new_high = prediction_interval(a)
    return dict(
        n=int(a.size),
        mean=float(a.mean()) if a.size else None,
        std=float(a.std(ddof=1)) if a.size > 1 else None,
        ci_low=low,
        ci_high=high,
        new_seed_low=new_low,
        new_seed_high=new_high,
    )
