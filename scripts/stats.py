"""Percentiles, the one implementation the drills and the benchmarks share."""

from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    cuts = statistics.quantiles(ordered, n=1000, method="inclusive")
    return ordered[0] if q <= 0 else ordered[-1] if q >= 1 else cuts[round(q * 1000) - 1]


def summary(values: list[float], digits: int = 4) -> dict:
    """n, median, p90, p99 and max; empty for no values."""
    if not values:
        return {}
    return {"n": len(values), "p50": round(percentile(values, 0.5), digits),
            "p90": round(percentile(values, 0.9), digits), "p99": round(percentile(values, 0.99), digits),
            "max": round(max(values), digits)}
