"""The consumer's counters and histograms, read by its metrics and its progress log."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from core.histogram import LATENCY_BOUNDS_S, Buckets

# Seconds from an event's Kafka create time to its features written in Redis.
FRESHNESS_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0)


@dataclass
class ConsumerStats:
    events: int = 0  # applied to a state
    malformed: int = 0  # sent to the dead-letter topic
    ignored: Counter[str] = field(default_factory=Counter)  # by Applied's value
    restarts: int = 0  # a symbol's feed started over (a later session)
    batches: int = 0
    records_written: int = 0
    # Kafka create time -> Redis write done, ms, for the latest batches (bounded).
    freshness_ms: list[float] = field(default_factory=list)
    # The same since start, in seconds, for the metrics.
    freshness: Buckets = field(default_factory=lambda: Buckets(FRESHNESS_BOUNDS_S))
    # Seconds each batch's feature write to Redis took, its retries included.
    write_latency: Buckets = field(default_factory=lambda: Buckets(LATENCY_BOUNDS_S))

    def note_freshness(self, created_ms: Iterable[int], written_ms: float) -> None:
        for created in created_ms:
            self.freshness_ms.append(written_ms - created)
            self.freshness.observe((written_ms - created) / 1e3)
        if len(self.freshness_ms) > 200_000:
            del self.freshness_ms[:100_000]
