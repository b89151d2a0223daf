"""The one percentile the service and its benchmarks report."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q`` (0..1) of the
    values at or below it; no interpolation, so it is always a value that was seen.
    0 when there are none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    # q * n is a float: 0.99 * 1000 comes out a hair above 990.
    rank = math.ceil(q * len(ordered) - 1e-9)
    return ordered[min(len(ordered), max(rank, 1)) - 1]
