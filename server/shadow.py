"""``ShadowScorer``: the challenger scores a sample of decisions, off the critical path.

The engine hands over a decision's rows after it has recorded the decision; the caller
never waits for the challenger. Sampled decisions are gathered for up to
``BATCH_WINDOW_MS`` (or ``BATCH_MAX_ROWS`` rows) into one challenger call; at most
``MAX_IN_FLIGHT`` calls run at once, and a batch due past that is dropped and counted,
never queued. Each shadow score is journalled as a ``ShadowRecord`` and feeds the
comparison figures. Flag and metrics: docs/oncall.md; the cost: docs/benchmarks.md#shadow.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.domain import Decision, model_decision
from core.drift import histogram, psi
from core.histogram import Buckets
from server.audit.record import ShadowRecord
from server.control.state import ControlState
from server.model_errors import ModelInputError
from server.replica import Admission, Attempt, Replica

log = logging.getLogger(__name__)

UNGUARDED = Admission(guarded=False)

# Score-difference histogram bounds (|challenger - champion|), for the metrics.
DIFF_BOUNDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# Pairs of champion and challenger scores the score PSI is over: enough for its deciles.
PSI_WINDOW = 2000
# One challenger call per this much of the sampled decisions: one call per decision cost
# the challenger and this process a request's overhead each, which on shared cores showed
# in the champion's tail latency (docs/benchmarks.md#shadow).
BATCH_WINDOW_MS = 200.0
BATCH_MAX_ROWS = 64  # a gathered call goes at once with this many rows
MAX_IN_FLIGHT = 16  # shadow calls at once; past it a batch is dropped, never queued
TIMEOUT_MS = 100.0  # a shadow call's wait: longer than the challenger's answers under load


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
    failed: int  # called or queued, no score (timeout, no time, error, breaker)
    agreed: int  # scored decisions whose challenger decision was the same
    in_flight: int  # decisions gathered for a call or in one
    score_difference: tuple[tuple[str, int], ...]  # cumulative (le, count), as Buckets
    score_difference_sum: float
    score_psi: float  # challenger vs champion scores over the window; 0 when too few


class ShadowScorer:
    def __init__(
        self,
        challenger: Replica,
        *,
        audit: ShadowAudit,
        threshold: float,
        max_in_flight: int = MAX_IN_FLIGHT,
        timeout_ms: float = TIMEOUT_MS,
        psi_window: int = PSI_WINDOW,
        batch_window_ms: float = BATCH_WINDOW_MS,
        batch_max_rows: int = BATCH_MAX_ROWS,
    ) -> None:
        self._challenger = challenger
        self._audit = audit
        self._max_in_flight = max_in_flight
        self._timeout_ms = timeout_ms
        self._threshold = threshold
        self._batch_window_s = batch_window_ms / 1000.0
        self._batch_max_rows = batch_max_rows
        self._batch_rows: list[Sequence[float]] = []
        self._batch: list[Shadowed] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_calls = 0
        self._champion_scores: deque[float] = deque(maxlen=psi_window)
        self._challenger_scores: deque[float] = deque(maxlen=psi_window)
        self._sampled = self._scored = self._dropped = self._failed = self._agreed = 0
        self._score_difference = Buckets(DIFF_BOUNDS)

    @property
    def replica_name(self) -> str:
        return self._challenger.name

    def submit(
        self,
        rows: Sequence[Sequence[float]],
        shadowed: Sequence[Shadowed],
        state: ControlState,
        now_us: int,
    ) -> None:
        """Adds these decisions to the next shadow call; a challenger on-call forced open
        drops them (counted)."""
        self._sampled += len(shadowed)
        if not self._challenger.admission(state, now_us, guarded=False).allowed:
            self._dropped += len(shadowed)
            return
        self._batch_rows.extend(rows)
        self._batch.extend(shadowed)
        if len(self._batch_rows) >= self._batch_max_rows or self._batch_window_s <= 0:
            self._flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(
                self._batch_window_s, self._flush
            )

    def _flush(self) -> None:
        """Sends the gathered decisions in one call, or drops them when saturated."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        rows, shadowed = self._batch_rows, self._batch
        if not shadowed:
            return
        self._batch_rows, self._batch = [], []
        if len(self._tasks) >= self._max_in_flight:
            self._dropped += len(shadowed)
            return
        self._in_calls += len(shadowed)
        task = asyncio.create_task(self._shadow(rows, shadowed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, rows: Sequence[Sequence[float]], shadowed: Sequence[Shadowed]) -> None:
        # In the trace of the decision that opened the batch (the task's context is its).
        with self._challenger.tracer.start_as_current_span("decision.shadow") as span:
            span.set_attribute("decision.shadowed", len(shadowed))
            try:
                await self._score(rows, shadowed)
            finally:
                self._in_calls -= len(shadowed)

    async def _score(self, rows: Sequence[Sequence[float]], shadowed: Sequence[Shadowed]) -> None:
        try:
            # Not through the challenger's breaker: shadow timeouts must not open it for
            # the canary, and in-flight calls are bounded already.
            attempt = await self._challenger.call(rows, self._timeout_ms, UNGUARDED)
        except ModelInputError as exc:
            attempt = Attempt(self._challenger.source, None, 0.0, exc)
        except Exception:  # a task's exception would otherwise go unseen
            self._failed += len(shadowed)
            log.exception("shadow call failed unexpectedly")
            return
        scores = attempt.scores
        if scores is None:
            self._failed += len(shadowed)
            log.debug("shadow call failed: %s", attempt.reason)
            return
        records = []
        for decision, score in zip(shadowed, scores.scores, strict=True):
            records.append(
                ShadowRecord(decision.decision_id, scores.model_name, scores.model_version, score)
            )
            self._scored += 1
            self._agreed += (
                model_decision(score, self._threshold) is Decision.TRADE
            ) == decision.trade
            self._score_difference.observe(abs(score - decision.score))
            self._champion_scores.append(decision.score)
            self._challenger_scores.append(score)
        try:
            self._audit.record_shadow(records)
        except Exception:  # the decision itself is recorded; a lost shadow is only logged
            log.exception("shadow scores not recorded")

    def agreement(self) -> tuple[int, int]:
        """Decisions scored in the shadow so far, and those the challenger agreed with
        (``stats`` without the PSI it computes: cheap enough for every second)."""
        return self._scored, self._agreed

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
            self._in_calls + len(self._batch),
            tuple(self._score_difference.cumulative()),
            self._score_difference.total,
            score_psi,
        )

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Sends the gathered decisions, lets shadow calls in flight finish (bounded),
        then cancels the rest."""
        self._flush()
        if not self._tasks:
            return
        _, late = await asyncio.wait(list(self._tasks), timeout=timeout_s)
        for task in late:
            task.cancel()
