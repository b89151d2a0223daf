"""The decision core: features → model (primary, one retry) → fallback ladder.

Transport-agnostic: it takes validated ``OrderRequest``s and a ``Budget`` and returns
``DecisionResult``s, each recorded in the audit journal first; the gRPC servicer only
converts. A single order is a batch of one,
so Decide and DecideBatch share every step: one Redis pipeline for the features, one
model call for all rows with fresh features, one pipeline for the cached scores.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis.exceptions

from fallback.chain import FallbackChain, LadderInput, LadderOutcome
from fallback.score_cache import CachedScore, ScoreCache, ScoreEntry
from feature_cache.schema import FEATURE_INDEX, first_unrepresentable, model_row
from feature_cache.store import FeatureReader, FeatureRecord
from server.audit.trail import DecisionAudit
from server.deadline import Budget
from server.domain import CallInfo, Decision, DecisionResult, OrderRequest, Side
from server.router import ReplicaRouter
from server.settings import DecisionSettings

log = logging.getLogger(__name__)

# Cached-score writes happen after the response, off the critical path; past this many
# in flight (Redis slow or down) new ones are dropped: the cache is best-effort, and the
# Redis connections are for the decisions' reads.
MAX_PENDING_SCORE_WRITES = 8
SCORE_WRITE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class _Features:
    values: Sequence[float] | None  # fresh values with overrides applied, else None
    age_ms: float  # -1 when there was no record


class DecisionEngine:
    def __init__(
        self,
        *,
        features: FeatureReader,
        router: ReplicaRouter,
        ladder: FallbackChain,
        score_cache: ScoreCache,
        audit: DecisionAudit,
        decision: DecisionSettings,
        feature_max_age_ms: float,
        score_write_interval_ms: float,
    ) -> None:
        self._features = features
        self._router = router
        self._ladder = ladder
        self._score_cache = score_cache
        self._audit = audit
        self._threshold = decision.threshold
        self._margin_ms = decision.response_margin_ms
        self._max_age_ms = feature_max_age_ms
        self._pending_writes: set[asyncio.Task[None]] = set()
        self._score_write_interval_us = int(score_write_interval_ms * 1000)
        self._score_written_at_us: dict[tuple[str, Side], int] = {}

    async def decide(
        self, orders: Sequence[OrderRequest], budget: Budget, call: CallInfo
    ) -> list[DecisionResult]:
        """Decides every order and records them in the audit journal before returning;
        raises ``AuditUnavailable`` (and returns nothing) when they cannot be recorded."""
        started = time.perf_counter_ns()
        reasons: list[list[str]] = [[] for _ in orders]
        features = await self._read_features(orders, budget, reasons)
        features_done = time.perf_counter_ns()

        scorable = {i: f.values for i, f in enumerate(features) if f.values is not None}
        outcomes: dict[int, LadderOutcome] = {}
        if scorable:
            outcomes = await self._score(orders, scorable, budget, reasons)
        model_done = time.perf_counter_ns()

        pending = [i for i in range(len(orders)) if i not in outcomes]
        if pending:
            ladder = [LadderInput(orders[i], features[i].values, reasons[i]) for i in pending]
            decided = await self._ladder.decide_many(ladder, budget)
            outcomes.update(zip(pending, decided, strict=True))

        finished = time.perf_counter_ns()
        decided_at = time.time_ns()
        results = []
        for i, (order, feature, why) in enumerate(zip(orders, features, reasons, strict=True)):
            outcome = outcomes[i]
            results.append(
                DecisionResult(
                    request_id=order.request_id,
                    decision_id=str(uuid.uuid4()),
                    decision=outcome.decision,
                    score=outcome.score,
                    threshold=outcome.threshold,
                    source=outcome.source,
                    model_name=outcome.model_name,
                    model_version=outcome.model_version,
                    reason="; ".join(why),
                    feature_age_ms=feature.age_ms,
                    features_us=(features_done - started) // 1000,
                    model_us=(model_done - features_done) // 1000,
                    total_us=(finished - started) // 1000,
                    decided_at_ns=decided_at,
                )
            )
        self._audit.record_decisions(call, orders, [f.values for f in features], results)
        return results

    async def _read_features(
        self, orders: Sequence[OrderRequest], budget: Budget, reasons: list[list[str]]
    ) -> list[_Features]:
        left_ms = budget.remaining_ms() - self._margin_ms
        records: Sequence[FeatureRecord | None] = [None] * len(orders)
        problem = ""
        if left_ms <= 0:
            problem = "features skipped: no budget left"
        else:
            try:
                async with asyncio.timeout(left_ms / 1000.0):
                    records = await self._features.read_many([o.symbol for o in orders])
            except TimeoutError:
                problem = f"feature store timed out after {left_ms:.1f} ms"
            except (redis.exceptions.RedisError, OSError) as exc:
                problem = f"feature store unavailable ({type(exc).__name__})"
                log.warning("feature read failed: %s", exc)
        now_us = time.time_ns() // 1000
        out = []
        for order, record, why in zip(orders, records, reasons, strict=True):
            if record is None:
                why.append(problem or f"no features for {order.symbol}")
                out.append(_Features(None, -1.0))
                continue
            age_ms = record.age_ms(now_us)
            if age_ms > self._max_age_ms:
                why.append(f"features stale: {age_ms:.0f} ms old (max {self._max_age_ms:.0f})")
                out.append(_Features(None, age_ms))
                continue
            values = list(record.values)
            for name, value in order.feature_overrides.items():
                values[FEATURE_INDEX[name]] = value
            problem_value = first_unrepresentable(values)
            if problem_value is not None:
                why.append(f"features unusable: {problem_value}")
                out.append(_Features(None, age_ms))
                continue
            out.append(_Features(values, age_ms))
        return out

    async def _score(
        self,
        orders: Sequence[OrderRequest],
        scorable: dict[int, Sequence[float]],
        budget: Budget,
        reasons: list[list[str]],
    ) -> dict[int, LadderOutcome]:
        """One model call for every order with fresh features; their outcomes by index."""
        rows = [model_row(orders[i].side.sign, values) for i, values in scorable.items()]
        call_reasons: list[str] = []
        routed = await self._router.score(rows, budget, call_reasons)
        if routed is None:
            for i in scorable:
                reasons[i].extend(call_reasons)
            return {}
        scores = routed.scores
        answered = f"{routed.source.name.lower()} answered in {scores.elapsed_ms:.1f} ms"
        scored_at_us = time.time_ns() // 1000
        entries = []
        outcomes = {}
        for i, score in zip(scorable, scores.scores, strict=True):
            reasons[i].extend([*call_reasons, answered])
            decision = Decision.TRADE if score >= self._threshold else Decision.NO_TRADE
            outcomes[i] = LadderOutcome(
                decision,
                score,
                self._threshold,
                routed.source,
                scores.model_name,
                scores.model_version,
            )
            cached = CachedScore(score, scores.model_name, scores.model_version, scored_at_us)
            entries.append(ScoreEntry(orders[i].symbol, orders[i].side, cached))
        self._remember_scores(entries)
        return outcomes

    def _remember_scores(self, entries: list[ScoreEntry]) -> None:
        """Writes the scores for the ladder unless this server wrote the key very recently."""
        if len(self._pending_writes) >= MAX_PENDING_SCORE_WRITES:
            return
        due = []
        for entry in entries:
            key = (entry.symbol, entry.side)
            scored_at = entry.score.scored_at_us
            if scored_at - self._score_written_at_us.get(key, 0) >= self._score_write_interval_us:
                self._score_written_at_us[key] = scored_at
                due.append(entry)
        if not due:
            return
        task = asyncio.create_task(self._write_scores(due))
        self._pending_writes.add(task)
        task.add_done_callback(self._write_done)

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._pending_writes.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("cached score write failed unexpectedly", exc_info=exc)

    async def _write_scores(self, entries: list[ScoreEntry]) -> None:
        try:
            async with asyncio.timeout(SCORE_WRITE_TIMEOUT_S):
                await self._score_cache.put_many(entries)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            log.warning("cached score write failed: %r", exc)

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Lets in-flight cached-score writes finish (bounded), then cancels the rest."""
        pending = list(self._pending_writes)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            task.cancel()
