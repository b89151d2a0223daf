"""``FeedWatch``: which symbols' market events the consumer has been ignoring, and since when.

A state ignores an event that its session's sequence has passed (a re-delivery) or that
belongs to an earlier session than its own (``feature_cache.features``). A few such
events in a burst are normal, after a producer's retry; a symbol whose events have all
been ignored for ``IGNORED_ALARM_S`` is not a burst: its features are frozen while its
feed goes on (a feed that starts over without a new session, two feeds for one symbol).
Such symbols are counted in the consumer's metrics and reported for ``decisionctl status``
(``core.reports``). Pure logic: the consumer passes the clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from core.reports import IgnoredFeed
from feature_cache.features import Applied

# Longer than any burst of re-deliveries lasts, short enough to tell on-call in seconds.
IGNORED_ALARM_S = 10.0
# How often the consumer reports the ignored symbols while there are any.
REPORT_INTERVAL_S = 2.0


@dataclass
class _Streak:
    since_s: float
    events: int
    reason: Applied


class FeedWatch:
    def __init__(self) -> None:
        self._streaks: dict[str, _Streak] = {}
        self._reported: set[str] = set()  # symbols reported as ignored, not yet cleared
        self._reported_at_s = float("-inf")

    def note(
        self, applied: Iterable[str], ignored: Counter[tuple[str, Applied]], now_s: float
    ) -> None:
        """A batch's outcome: the symbols it applied events of, and the events it ignored
        (by symbol and why). A symbol with an applied event is live again."""
        live = set(applied)
        for symbol in live:
            self._streaks.pop(symbol, None)
        for (symbol, reason), count in ignored.items():
            if symbol in live:
                continue
            streak = self._streaks.get(symbol)
            if streak is None:
                self._streaks[symbol] = _Streak(now_s, count, reason)
            else:
                streak.events += count
                streak.reason = reason

    def forget(self, symbols: Iterable[str]) -> None:
        """Symbols of a partition another consumer takes over."""
        for symbol in symbols:
            self._streaks.pop(symbol, None)

    def ignored(self, now_s: float) -> dict[str, _Streak]:
        """The symbols whose events have all been ignored for ``IGNORED_ALARM_S`` or more."""
        return {
            symbol: streak
            for symbol, streak in self._streaks.items()
            if now_s - streak.since_s >= IGNORED_ALARM_S
        }

    def report(self, now_s: float, now_us: int) -> tuple[list[IgnoredFeed], list[str]] | None:
        """What to write to the status report now: the ignored symbols and those that no
        longer are; None when nothing is due (nothing ignored and nothing to clear, or
        the last report is recent)."""
        ignored = self.ignored(now_s)
        resumed = [symbol for symbol in self._reported if symbol not in ignored]
        if not resumed and (not ignored or now_s - self._reported_at_s < REPORT_INTERVAL_S):
            return None
        self._reported = set(ignored)
        self._reported_at_s = now_s
        offset_us = now_us - int(now_s * 1e6)  # the monotonic clock, as wall clock
        feeds = [
            IgnoredFeed(
                symbol,
                since_us=int(streak.since_s * 1e6) + offset_us,
                events=streak.events,
                reason=streak.reason.value,
                at_us=now_us,
            )
            for symbol, streak in sorted(ignored.items())
        ]
        return feeds, sorted(resumed)
