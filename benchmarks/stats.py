"""Summary statistics of repeated runs: median and spread, Ember/reference ratios, targets.

Pure functions over lists of floats (Python's statistics module; quartiles by
its default 'exclusive' method, which needs no more than two samples).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Literal

Better = Literal["lower", "higher"]


@dataclass(frozen=True)
class Summary:
    """Median, extremes and quartiles of one series of runs."""

    n: int
    median: float
    low: float
    high: float
    q1: float
    q3: float


def summarize(values: list[float]) -> Summary:
    """Summarize ``values`` (at least one)."""
    if not values:
        raise ValueError("no values to summarize")
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1 = q3 = ordered[0]
    return Summary(len(ordered), statistics.median(ordered), ordered[0], ordered[-1], q1, q3)


def ratio(ember: list[float], reference: list[float]) -> float | None:
    """Ember's median over the reference's median (None when undefined)."""
    if not ember or not reference:
        return None
    denominator = statistics.median(reference)
    if denominator == 0:
        return None
    return statistics.median(ember) / denominator


def meets(value: float | None, target: float | None, better: Better) -> bool | None:
    """Whether a ratio meets its target (None when there is no ratio or no target)."""
    if value is None or target is None:
        return None
    return value <= target if better == "lower" else value >= target
