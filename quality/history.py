"""``MidHistory``: one symbol's mid prices by exchange time, for a bounded span."""

from __future__ import annotations

from bisect import bisect_right


class MidHistory:
    """The mid in effect at any exchange time from ``first_us`` to ``seen_until_us``.

    Fed in exchange-time order (one symbol's events are, within its partition). Only
    changes of the mid are kept; ``prune`` drops what is older than a bound but keeps the
    point in effect at it, so a lookup there still answers.
    """

    def __init__(self) -> None:
        self._times: list[int] = []
        self._mids: list[float] = []
        self._start = 0  # points before it are pruned (dropped in bulk when they pile up)
        self.seen_until_us = 0  # exchange time of the last event seen, mid or not

    @property
    def first_us(self) -> int | None:
        """The earliest time a lookup answers for; None before the first mid."""
        return self._times[self._start] if self._start < len(self._times) else None

    def __len__(self) -> int:
        return len(self._times) - self._start

    def note(self, time_us: int, mid: float | None) -> None:
        """An event at ``time_us`` after which the mid is ``mid`` (None: the book has no
        touch, and the mid in effect does not change)."""
        if time_us < self.seen_until_us:
            return  # out of order: the last mid stays the one in effect
        self.seen_until_us = time_us
        if mid is None:
            return
        if len(self) and self._mids[-1] == mid:
            return
        if len(self) and self._times[-1] == time_us:
            self._mids[-1] = mid  # the mid in effect at a time is the last one applied
        else:
            self._times.append(time_us)
            self._mids.append(mid)

    def mid_at(self, time_us: int) -> float | None:
        """The mid in effect at ``time_us`` (the last one at or before it); None before
        ``first_us``."""
        i = bisect_right(self._times, time_us, lo=self._start) - 1
        return self._mids[i] if i >= self._start else None

    def prune(self, before_us: int) -> None:
        """Forgets points older than ``before_us`` except the one in effect at it."""
        keep_from = bisect_right(self._times, before_us, lo=self._start) - 1
        if keep_from > self._start:
            self._start = keep_from
        if self._start > 1024 and self._start * 2 > len(self._times):
            del self._times[: self._start]
            del self._mids[: self._start]
            self._start = 0
