"""Rolling windows on exchange event time, the building blocks of ``SymbolState``.

A ``SumWindow`` keeps the entries of the last span and their running sum; an
``AsOfWindow`` keeps enough history to tell the value in effect a span ago. Both are
pruned on each addition, so their contents, and the order of the float operations on a
running sum, depend on the entries added alone, never on when a reader pruned them.
"""

from __future__ import annotations

import math
from collections import deque

RESUM_EVERY = 4096
"""Removals from a window between exact re-sums of its running sum. Between two, the sum
carries at most about (2 * RESUM_EVERY + entries) half-ulps of its largest magnitude;
re-summing costs one pass over the window, so the cost per removal stays O(1). Changing it
changes feature bits, as a checkpoint format change would."""


class Series:
    """Time-stamped values, oldest first."""

    __slots__ = ("span_us", "times", "values")

    def __init__(self, span_us: int) -> None:
        self.span_us = span_us
        self.times: deque[int] = deque()
        self.values: deque[float] = deque()


class SumWindow(Series):
    """Holds the values with time > now - span_us once pruned, and ``total``, their sum.

    ``total`` is a running sum, re-summed exactly every ``RESUM_EVERY`` removals.
    """

    __slots__ = ("removals", "total")

    def __init__(self, span_us: int) -> None:
        super().__init__(span_us)
        self.total = 0.0
        self.removals = 0
        """Removals since ``total`` was last exact."""

    def add(self, time_us: int, value: float) -> None:
        # Pruning before the append fixes the order of float operations on ``total``:
        # features() pruning early only does first what this would have done first.
        # Pruning on each add also bounds memory even if features() is never read.
        self.prune(time_us)
        self.times.append(time_us)
        self.values.append(value)
        self.total += value

    def prune(self, now_us: int) -> None:
        cutoff = now_us - self.span_us
        times = self.times
        if not times or times[0] > cutoff:
            return
        values = self.values
        total, removals = self.total, self.removals
        while times and times[0] <= cutoff:
            times.popleft()
            total -= values.popleft()
            removals += 1
            if removals >= RESUM_EVERY:  # at a fixed removal, so replays re-sum alike
                total = math.fsum(values)
                removals = 0
        if not times:
            total, removals = 0.0, 0
        self.total, self.removals = total, removals


class AsOfWindow(Series):
    """Mid history: keeps the last entry at or before now - span_us and all newer ones.

    ``values[0]`` is then the value in effect span_us ago, or the oldest known one.
    """

    __slots__ = ()

    def add(self, time_us: int, value: float) -> None:
        self.times.append(time_us)
        self.values.append(value)
        self.prune(time_us)

    def prune(self, now_us: int) -> None:
        cutoff = now_us - self.span_us
        times, values = self.times, self.values
        while len(times) > 1 and times[1] <= cutoff:
            times.popleft()
            values.popleft()
