"""``ShadowScorer``: the challenger scores a sample of decisions, off the critical path.

The engine hands over a decision's rows after it has recorded the decision and before
it answers; the call to the challenger runs as its own task, so the caller never waits
for it. At most ``max_in_flight`` shadow calls run at once: past that a sampled decision
is dropped and counted, never queued (a slow challenger must not pile up work).

Each shadow score is appended to the audit journal as a ``ShadowRecord`` (the shipper
fills the decision row's shadow columns) and feeds the comparison figures: agreement
with the decision, score difference, and the PSI of the challenger's scores against
the champion's over the last ``psi_window`` pairs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from server.audit.record import ShadowRecord
from server.control.state import BreakerMode
from server.model_client import ModelCallError, ModelInputError
from server.router import Replica
from torchserve.reference import histogram, psi

log = logging.getLogger(__name__)

# Score-difference histogram bounds (|challenger - champion|), for the metrics.
DIFF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class ShadowAudit(Protocol):
    def record_shadow(self, records: Sequence[ShadowRecord]) -> None: ...


@dataclass(frozen=True, slots=True)
class Shadowed:
    """One decision the champion scored, as the shadow call needs it."""

    decision_id: str
    score: float
    trade: bool


@dataclass(frozen=True, slots=True)
class ShadowStats:
    sampled: int
    scored: int
    dropped: int  # saturated: not called
    failed: int  # called, no score (timeout, error, breaker)
    agreed: int  # scored decisions whose challenger decision was the same
    in_flight: int
    diff_counts: tuple[int, ...]  # cumulative counts per DIFF_BUCKETS bound
    diff_sum: float
    score_psi: float  # challenger vs champion scores over the window; 0 when too few


class ShadowScorer:
    def __init__(
        self,
        challenger: Replica,
        *,
        audit: ShadowAudit,
        max_in_flight: int,
        timeout_ms: float,
        threshold: float,
        psi_window: int,
    ) -> None:
        self._challenger = challenger
        self._audit = audit
        self._max_in_flight = max_in_flight
        self._timeout_s = timeout_ms / 1000.0
        self._threshold = threshold
        self._tasks: set[asyncio.Task[None]] = set()
        self._champion_scores: deque[float] = deque(maxlen=psi_window)
        self._challenger_scores: deque[float] = deque(maxlen=psi_window)
        self._sampled = self._scored = self._dropped = self._failed = self._agreed = 0
        self._diff_counts = [0] * len(DIFF_BUCKETS)
        self._diff_sum = 0.0

    @property
    def replica_name(self) -> str:
        return self._challenger.name

    def submit(
        self, rows: Sequence[Sequence[float]], shadowed: Sequence[Shadowed], mode: BreakerMode
    ) -> None:
        """Starts the shadow call for these decisions, or drops it when saturated."""
        self._sampled += len(shadowed)
        if mode is BreakerMode.FORCE_OPEN or len(self._tasks) >= self._max_in_flight:
            self._dropped += len(shadowed)
            return
        task = asyncio.create_task(self._shadow(rows, shadowed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, rows: Sequence[Sequence[float]], shadowed: Sequence[Shadowed]) -> None:
        replica = self._challenger
        started = time.perf_counter()
        try:
            # Not through the challenger's breaker: shadow timeouts must not open it for
            # the canary, and in-flight calls are bounded already.
            scores = await replica.client.predict(rows, self._timeout_s)
        except (ModelCallError, ModelInputError) as exc:
            self._failed += len(shadowed)
            replica.recent.record((time.perf_counter() - started) * 1000, ok=False)
            log.debug("shadow call failed: %s", exc)
            return
        except Exception:  # a task's exception would otherwise go unseen
            self._failed += len(shadowed)
            log.exception("shadow call failed unexpectedly")
            return
        replica.recent.record(scores.elapsed_ms, ok=True, version=scores.model_version)
        records = []
        for decision, score in zip(shadowed, scores.scores, strict=True):
            records.append(
                ShadowRecord(decision.decision_id, scores.model_name, scores.model_version, score)
            )
            self._scored += 1
            self._agreed += (score >= self._threshold) == decision.trade
            diff = abs(score - decision.score)
            self._diff_sum += diff
            for i, bound in enumerate(DIFF_BUCKETS):
                if diff <= bound:
                    self._diff_counts[i] += 1
            self._champion_scores.append(decision.score)
            self._challenger_scores.append(score)
        try:
            self._audit.record_shadow(records)
        except Exception:  # the decision itself is recorded; a lost shadow is only logged
            log.exception("shadow scores not recorded")

    def stats(self) -> ShadowStats:
        score_psi = 0.0
        if len(self._champion_scores) >= 10:
            reference = histogram(np.asarray(self._champion_scores))
            score_psi = psi(reference, np.asarray(self._challenger_scores))
        return ShadowStats(
            self._sampled,
            self._scored,
            self._dropped,
            self._failed,
            self._agreed,
            len(self._tasks),
            tuple(self._diff_counts),
            self._diff_sum,
            score_psi,
        )

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Lets shadow calls in flight finish (bounded), then cancels the rest."""
        if not self._tasks:
            return
        _, late = await asyncio.wait(list(self._tasks), timeout=timeout_s)
        for task in late:
            task.cancel()
