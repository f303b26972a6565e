"""The timing loop of the benchmarks: timed calls, variants interleaved round by round,
and the spread of per-round ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from scipy import stats
from tqdm import tqdm


def time_calls(call: Callable[[], Any], n: int) -> list[float]:
    """Seconds of each of `n` calls of `call`, which must return only once its work is
    done (block on the device's results inside it)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


class Variant:
    """A named piece of work: ``run(n)`` times n calls and returns the seconds of each."""

    def __init__(self, name: str, run: Callable[[int], list[float]], info: dict[str, Any]):
        self.name, self.run, self.info = name, run, info


def interleave(
    variants: Sequence[Variant], repeats: int, steps: int, desc: str
) -> dict[str, list[list[float]]]:
    """Times every variant `repeats` rounds of `steps` calls, the order rotating every
    round so that load from other jobs hits every variant alike.

    Returns:
      name -> one list of call times per round.
    """
    variants = list(variants)
    times: dict[str, list[list[float]]] = {v.name: [] for v in variants}
    for r in tqdm(range(repeats), desc=desc):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            times[v.name].append(v.run(steps))
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (the one value twice for a single one)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, range and count."""
    q1, q3 = quartiles(values)
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median (the sign-test interval):
    the order statistics x_(k) and x_(n+1-k) for the largest k with
    P(Binomial(n, 1/2) <= k - 1) <= (1 - level) / 2; the whole range when n is too small."""
    xs, n = sorted(values), len(values)
    k = 0
    while stats.binom.cdf(k, n, 0.5) <= (1 - level) / 2:
        k += 1
    k = max(k, 1)
    return xs[k - 1], xs[n - k]
