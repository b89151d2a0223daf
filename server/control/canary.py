"""``CanaryMonitor``: the canary's decisions against the champion's, over a sliding window.

A breach is the canary doing worse than the champion by more than a limit on error and
timeout rate, p99 latency, fallback rate or score PSI, each judged once both sides have
enough in the window (``MIN_DECISIONS``, ``PSI_MIN_SCORES``). A breach rolls the canary
back on every server (flag ``canary_auto_rollback``); a promotion waits until every limit
is judged and none is breached (``why_not_promote``). A new canary setting starts the
windows afresh: a weight is judged only on decisions made under it. On-call's side:
docs/oncall.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np

from core.drift import histogram, psi
from core.stats import percentile
from core.tasks import cancel_and_wait
from server.settings import CanarySettings

log = logging.getLogger(__name__)

CANARY: Final = "canary"
CHAMPION: Final = "champion"
# The comparison runs this often, in a task of its own while decisions are recorded,
# never in a Decide.
CHECK_INTERVAL_S = 0.2
MAX_RECORDS = 20_000  # per side: bounds memory whatever the rate
PSI_MIN_SCORES = 500
# The sliding window the two sides are compared over: long enough for MIN_DECISIONS at a
# canary's share of one server's traffic, short enough to catch a bad model in a minute.
WINDOW_S = 30.0
# Decisions each side needs in the window before it is judged, and before this server
# takes a promotion: fewer, and one slow call is the whole p99.
MIN_DECISIONS = 50
# Added to the champion's p99 times the ratio limit: a 1 ms champion must not make a
# 3 ms canary a breach.
P99_SLACK_MS = 5.0
# Score PSI against the champion past which the canary is broken (a constant score), far
# above what a recalibrated challenger shows (docs/oncall.md).
MAX_SCORE_PSI = 2.0


@dataclass(frozen=True, slots=True)
class WindowSummary:
    decisions: int
    error_rate: float
    p99_ms: float
    fallback_rate: float
    scores: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class CanaryComparison:
    canary: WindowSummary
    champion: WindowSummary
    score_psi: float | None  # None until each side has PSI_MIN_SCORES scores


# In the server: server.control.changes.CanaryRollback.
class CanaryLever(Protocol):
    def setting(self) -> object:
        """The canary setting in effect; the windows start afresh when it changes."""
        ...

    def enabled(self) -> bool:
        """Whether a breach rolls the canary back by itself."""
        ...

    async def roll_back(self, breach: str) -> bool:
        """Sets the weight to 0; False when it already was (another server did it)."""
        ...


class _Side:
    def __init__(self) -> None:
        # (monotonic s, model call ok, its ms, fell back, scores)
        self.records: deque[tuple[float, bool, float, bool, tuple[float, ...]]] = deque(
            maxlen=MAX_RECORDS
        )

    def add(self, ok: bool, elapsed_ms: float, fell_back: bool, scores: Sequence[float]) -> None:
        self.records.append((time.monotonic(), ok, elapsed_ms, fell_back, tuple(scores)))

    def summary(self, since_s: float) -> WindowSummary:
        while self.records and self.records[0][0] < since_s:
            self.records.popleft()
        n = len(self.records)
        if n == 0:
            return WindowSummary(0, 0.0, 0.0, 0.0, ())
        errors = sum(1 for _, ok, _, _, _ in self.records if not ok)
        fell_back = sum(1 for _, _, _, fb, _ in self.records if fb)
        latencies = sorted(ms for _, ok, ms, _, _ in self.records if ok)
        scores = tuple(s for *_, row_scores in self.records for s in row_scores)
        return WindowSummary(n, errors / n, percentile(latencies, 0.99), fell_back / n, scores)


class CanaryMonitor:
    def __init__(self, limits: CanarySettings, lever: CanaryLever) -> None:
        self._limits = limits
        self._lever = lever
        self._judged_setting = lever.setting()
        self._sides = {CANARY: _Side(), CHAMPION: _Side()}
        self._watcher: asyncio.Task[None] | None = None
        self.rollbacks = 0  # rollbacks this server made (another's write may win), for metrics

    def record(
        self,
        side: str,
        *,
        ok: bool,
        elapsed_ms: float,
        fell_back: bool,
        scores: Sequence[float] = (),
    ) -> None:
        """Only appends: the hot path never pays for the comparison (see ``_watch``)."""
        self._sides[side].add(ok, elapsed_ms, fell_back, scores)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="canary-watch")

    async def _watch(self) -> None:
        """Compares the sides every ``CHECK_INTERVAL_S`` while decisions are recorded;
        ends when the window is empty (no canary), restarted by the next record."""
        while any(side.records for side in self._sides.values()):
            await asyncio.sleep(CHECK_INTERVAL_S)
            setting = self._lever.setting()
            if setting != self._judged_setting:
                self._judged_setting = setting
                self.reset()
                continue
            if not self._lever.enabled():
                continue
            breach = self.breach()
            if breach is None:
                continue
            log.warning("canary breach: %s", breach)
            try:
                self.rollbacks += await self._lever.roll_back(breach)
            except Exception:  # retried at the next check
                log.exception("canary rollback failed")

    def reset(self) -> None:
        for side in self._sides.values():
            side.records.clear()

    def compare(self) -> CanaryComparison:
        since = time.monotonic() - WINDOW_S
        canary = self._sides[CANARY].summary(since)
        champion = self._sides[CHAMPION].summary(since)
        score_psi = None
        # Deciles of two samples of the same distribution differ by ~9/n in PSI each:
        # below a few hundred scores PSI is noise, not drift.
        if len(canary.scores) >= PSI_MIN_SCORES and len(champion.scores) >= PSI_MIN_SCORES:
            reference = histogram(np.asarray(champion.scores))
            score_psi = psi(reference, np.asarray(canary.scores))
        return CanaryComparison(canary, champion, score_psi)

    def breach(self) -> str | None:
        """Which limit the canary breaches now, in words; None when none (or too few)."""
        c = self.compare()
        return self._breach(c) if self._judged(c) else None

    def why_not_promote(self, c: CanaryComparison) -> str | None:
        """Why the canary may not be promoted on this server's evidence (``compare()``'s
        comparison), in words; None when every limit is evaluated and none is breached."""
        breach = self._breach(c) if self._judged(c) else None
        if breach is not None:
            return f"the canary breaches a limit: {breach}"
        waiting = waiting_for(c)
        if waiting:
            return (
                f"not judged yet: in the last {WINDOW_S:g} s under the weight now set, "
                + "; ".join(waiting)
            )
        return None

    def _judged(self, c: CanaryComparison) -> bool:
        return c.canary.decisions >= MIN_DECISIONS and c.champion.decisions >= MIN_DECISIONS

    def _breach(self, c: CanaryComparison) -> str | None:
        limits = self._limits
        canary, champion = c.canary, c.champion
        window = f"over the last {WINDOW_S:g} s"
        if canary.error_rate - champion.error_rate > limits.max_error_rate_increase:
            return (
                f"error/timeout rate {canary.error_rate:.0%} vs champion"
                f" {champion.error_rate:.0%} (limit +{limits.max_error_rate_increase:.0%}) {window}"
            )
        p99_limit_ms = champion.p99_ms * limits.max_p99_ratio + P99_SLACK_MS
        if canary.p99_ms > p99_limit_ms:
            return (
                f"p99 {canary.p99_ms:.1f} ms vs champion {champion.p99_ms:.1f} ms"
                f" (limit {p99_limit_ms:.1f} ms) {window}"
            )
        if canary.fallback_rate - champion.fallback_rate > limits.max_fallback_rate_increase:
            return (
                f"fallback rate {canary.fallback_rate:.0%} vs champion"
                f" {champion.fallback_rate:.0%}"
                f" (limit +{limits.max_fallback_rate_increase:.0%}) {window}"
            )
        if c.score_psi is not None and c.score_psi > MAX_SCORE_PSI:
            return (
                f"score PSI {c.score_psi:.2f} against the champion's scores"
                f" (limit {MAX_SCORE_PSI:.2f}) {window}"
            )
        return None

    async def stop(self) -> None:
        await cancel_and_wait(self._watcher)


def waiting_for(c: CanaryComparison) -> list[str]:
    """The limits that cannot be evaluated yet, each with what it waits for; empty when
    every one can."""
    waiting = []
    if c.canary.decisions < MIN_DECISIONS or c.champion.decisions < MIN_DECISIONS:
        waiting.append(
            f"error rate, p99 and fallback rate wait for {MIN_DECISIONS} decisions a side"
            f" (canary {c.canary.decisions}, champion {c.champion.decisions})"
        )
    if c.score_psi is None:
        waiting.append(
            f"score PSI waits for {PSI_MIN_SCORES} scores a side"
            f" (canary {len(c.canary.scores)}, champion {len(c.champion.scores)})"
        )
    return waiting
