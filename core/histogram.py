"""``Buckets``: a fixed-bound histogram the hot path fills and a metrics collector reads.

An observation is a binary search and two additions (well under a microsecond), with no
lock: every writer of one instance runs on one event loop, and a scrape reads counts
that are at most one observation behind. The collector turns them into Prometheus's
cumulative ``le`` buckets.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from prometheus_client.utils import floatToGoString

# Seconds: dense below 20 ms, where a 10 ms latency objective is judged.
LATENCY_BOUNDS_S = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class Buckets:
    __slots__ = ("_counts", "bounds", "count", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def counts(self) -> list[int]:
        """Observations per bucket (not cumulative), the last one above every bound."""
        return list(self._counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, observations at or below it)`` per bound, ending with ``+Inf``; ``le`` as
        prometheus_client writes it, so these histograms' buckets match its own."""
        counts = list(self._counts)  # one copy: a scrape's thread reads while the loop adds
        running = 0
        buckets = []
        for bound, count in zip(self.bounds, counts, strict=False):
            running += count
            buckets.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
        buckets.append(("+Inf", running + counts[-1]))
        return buckets


def quantile_bound(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile of ``counts`` (per bucket,
    the last above every bound: ``inf``); None when there is no observation."""
    total = sum(counts)
    if total <= 0:
        return None
    running = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=False):
        running += count
        if running >= q * total:
            return bound
    return float("inf")
