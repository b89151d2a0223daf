"""``RecentCalls``: what the last calls to something did, over a sliding time window.

Bounded in both time and count, so a burst cannot grow it; summaries sort at most
``max_calls`` latencies, which is cheap at the rate on-call and the canary read them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from core.histogram import LATENCY_BOUNDS_S, Buckets
from core.stats import percentile


@dataclass(frozen=True, slots=True)
class CallSummary:
    calls: int
    failures: int
    p50_ms: float  # of the successful calls; 0 when none
    p99_ms: float

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0


class RecentCalls:
    def __init__(self, *, window_s: float = 60.0, max_calls: int = 4096) -> None:
        self._window_s = window_s
        self._calls: deque[tuple[float, float, bool]] = deque(maxlen=max_calls)
        self.last_version = ""  # the model version of the last successful call
        # Since start, for metrics: latency in seconds of the successful and failed calls.
        self.ok_latency = Buckets(LATENCY_BOUNDS_S)
        self.failed_latency = Buckets(LATENCY_BOUNDS_S)

    def record(
        self, elapsed_ms: float, *, ok: bool, version: str = "", now_s: float | None = None
    ) -> None:
        self._calls.append((time.monotonic() if now_s is None else now_s, elapsed_ms, ok))
        (self.ok_latency if ok else self.failed_latency).observe(elapsed_ms / 1e3)
        if version:
            self.last_version = version

    def _trim(self, now_s: float | None) -> None:
        since = (time.monotonic() if now_s is None else now_s) - self._window_s
        while self._calls and self._calls[0][0] < since:
            self._calls.popleft()

    def percentile_ms(
        self, q: float, now_s: float | None = None, *, within_s: float | None = None
    ) -> float:
        """The q-quantile of the successful calls' latencies in the window, or in its last
        ``within_s`` seconds (0: none)."""
        self._trim(now_s)
        if within_s is None:
            return percentile((ms for _, ms, ok in self._calls if ok), q)
        since = (time.monotonic() if now_s is None else now_s) - within_s
        return percentile((ms for at, ms, ok in self._calls if ok and at >= since), q)

    def summary(self, now_s: float | None = None) -> CallSummary:
        self._trim(now_s)
        latencies = sorted(ms for _, ms, ok in self._calls if ok)
        failures = sum(1 for _, _, ok in self._calls if not ok)
        return CallSummary(
            len(self._calls), failures, percentile(latencies, 0.50), percentile(latencies, 0.99)
        )
