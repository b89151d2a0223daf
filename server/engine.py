"""The decision engine: kill switch → features → model (primary, one retry) → fallback ladder.

Transport-agnostic: it takes validated ``OrderRequest``s and a ``Budget`` and returns
``DecisionResult``s, each recorded in the audit journal first; the gRPC servicer only
converts. A single order is a batch of one,
so Decide and DecideBatch share every step: one Redis pipeline for the features, one
model call for all rows with fresh features, one pipeline for the cached scores.

The shared control state is read once per call: an engaged kill switch makes the order
ABSTAIN before anything else; the canary weight sends the call to the challenger first
(its outcome feeds the ``CanaryMonitor``); the shadow sample rate hands a champion-scored
call's rows to the ``ShadowScorer`` after the decisions are recorded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

import redis.exceptions

from core.deadline import Budget, StoreBusy, StoreReads
from core.domain import (
    CallInfo,
    Decision,
    DecisionResult,
    OrderRequest,
    Side,
    Source,
    model_decision,
)
from fallback.chain import FallbackChain, LadderInput, LadderOutcome
from fallback.score_cache import CachedScore, ScoreCache, ScoreEntry
from feature_cache.schema import FEATURE_INDEX, first_unrepresentable, model_row
from feature_cache.store import FeatureReader, FeatureRecord
from server.audit.trail import DecisionAudit
from server.control.canary import CANARY, CHAMPION, CanaryMonitor
from server.control.flags import SHADOW_SAMPLE_RATE
from server.control.state import GLOBAL_SCOPE, ControlState
from server.errors import Overloaded
from server.router import Attempt, ReplicaRouter
from server.settings import DecisionSettings
from server.shadow import Shadowed, ShadowScorer

log = logging.getLogger(__name__)

# Cached-score writes happen after the response, off the critical path; past this many
# in flight (Redis slow or down) new ones are dropped: the cache is best-effort, and the
# Redis connections are for the decisions' reads.
MAX_PENDING_SCORE_WRITES = 8
SCORE_WRITE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class _ShadowCall:
    rows: Sequence[Sequence[float]]
    scores: dict[int, float]  # the champion's score, by order index


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
        redis_reads: StoreReads,
        control: Callable[[], ControlState] = ControlState,
        canary: CanaryMonitor | None = None,
        shadow: ShadowScorer | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._features = features
        self._router = router
        self._ladder = ladder
        self._score_cache = score_cache
        self._audit = audit
        self._threshold = decision.threshold
        self._redis_reads = redis_reads
        self._max_age_ms = feature_max_age_ms
        self._pending_writes: set[asyncio.Task[None]] = set()
        self._score_write_interval_us = int(score_write_interval_ms * 1000)
        self._score_written_at_us: dict[tuple[str, Side], int] = {}
        self._control = control
        self._canary = canary
        self._shadow = shadow
        self._rng = rng or random.Random()  # noqa: S311 - sampling, not security
        self._max_in_flight = decision.max_in_flight
        self._shed_to_rules = decision.overload_action == "rules"
        self._in_flight = 0
        self.shed = 0  # decisions shed so far (rejected, or decided without the model)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def decide(
        self, orders: Sequence[OrderRequest], budget: Budget, call: CallInfo
    ) -> list[DecisionResult]:
        """Decides every order and records them in the audit journal before returning;
        raises ``AuditUnavailable`` (and returns nothing) when they cannot be recorded,
        and ``Overloaded`` when shedding by rejection."""
        limit = self._max_in_flight
        overloaded = 0 < limit < self._in_flight + len(orders) and self._in_flight > 0
        if overloaded:
            self.shed += len(orders)
            if not self._shed_to_rules:
                raise Overloaded(self._in_flight, limit)
        self._in_flight += len(orders)
        try:
            return await self._decide(orders, budget, call, overloaded=overloaded)
        finally:
            self._in_flight -= len(orders)

    async def _decide(
        self,
        orders: Sequence[OrderRequest],
        budget: Budget,
        call: CallInfo,
        *,
        overloaded: bool,
    ) -> list[DecisionResult]:
        started = time.perf_counter_ns()
        state = self._control()
        now_us = time.time_ns() // 1000
        reasons: list[list[str]] = [[] for _ in orders]
        outcomes = self._kill_switched(orders, state, now_us, reasons)
        features, store_failure = await self._read_features(orders, budget, reasons, skip=outcomes)
        features_done = time.perf_counter_ns()

        scorable = {i: f.values for i, f in enumerate(features) if f.values is not None}
        shadowed: _ShadowCall | None = None
        if scorable and overloaded:
            for i in scorable:
                reasons[i].append(f"overloaded: model skipped ({self._in_flight} in flight)")
        elif scorable:
            weight, _ = state.canary(now_us)
            canary = weight > 0 and self._canary is not None and self._rng.random() < weight
            scored, shadowed = await self._score(
                orders,
                scorable,
                budget,
                reasons,
                canary=canary,
                monitored=weight > 0,
                state=state,
                now_us=now_us,
            )
            outcomes.update(scored)
        model_done = time.perf_counter_ns()

        pending = [i for i in range(len(orders)) if i not in outcomes]
        if pending:
            ladder = [LadderInput(orders[i], features[i].values, reasons[i]) for i in pending]
            decided = await self._ladder.decide_many(ladder, budget, store_failure=store_failure)
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
        if shadowed is not None and self._shadow is not None:
            rate = state.flag_value(SHADOW_SAMPLE_RATE, now_us)
            if rate > 0 and self._rng.random() < rate:
                self._shadow.submit(
                    shadowed.rows,
                    [
                        Shadowed(
                            results[i].decision_id, score, results[i].decision is Decision.TRADE
                        )
                        for i, score in shadowed.scores.items()
                    ],
                    state.breaker_mode(self._shadow.replica_name, now_us),
                )
        return results

    def _kill_switched(
        self,
        orders: Sequence[OrderRequest],
        state: ControlState,
        now_us: int,
        reasons: list[list[str]],
    ) -> dict[int, LadderOutcome]:
        """ABSTAIN outcomes, by index, for the orders an engaged kill switch stops."""
        if not state.entries:
            return {}
        stopped = {}
        for i, order in enumerate(orders):
            switch = state.kill_switch(order.symbol, now_us)
            if switch is None:
                continue
            scope, change = switch
            what = "all symbols" if scope == GLOBAL_SCOPE else scope
            reasons[i].append(
                f"kill switch for {what} engaged by {change.changed_by}: {change.reason}"
            )
            stopped[i] = self._ladder.abstain()
        return stopped

    async def _read_features(
        self,
        orders: Sequence[OrderRequest],
        budget: Budget,
        reasons: list[list[str]],
        *,
        skip: Container[int] = (),
    ) -> tuple[list[_Features], str]:
        """The features of each order (none for the orders in ``skip``, already decided),
        and why the feature store failed to answer ("" when it answered)."""
        wanted = [i for i in range(len(orders)) if i not in skip]
        if not wanted:
            return [_Features(None, -1.0)] * len(orders), ""
        left_ms = self._redis_reads.timeout_ms(budget)
        records: list[FeatureRecord | None] = [None] * len(orders)
        problem = store_failure = ""
        if left_ms <= 0:
            problem = "features skipped: no budget left"
        else:
            try:
                read = await self._redis_reads.run(
                    self._features.read_many([orders[i].symbol for i in wanted]), left_ms
                )
                for i, record in zip(wanted, read, strict=True):
                    records[i] = record
            except TimeoutError:
                problem = f"feature store timed out after {left_ms:.1f} ms"
            except StoreBusy as exc:
                problem = f"feature store busy: {exc}"
            except (redis.exceptions.RedisError, OSError) as exc:
                problem = f"feature store unavailable ({type(exc).__name__})"
                log.warning("feature read failed: %s", exc)
            store_failure = problem
        now_us = time.time_ns() // 1000
        out = []
        for i, (order, record, why) in enumerate(zip(orders, records, reasons, strict=True)):
            if i in skip:
                out.append(_Features(None, -1.0))
                continue
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
        return out, store_failure

    async def _score(
        self,
        orders: Sequence[OrderRequest],
        scorable: dict[int, Sequence[float]],
        budget: Budget,
        reasons: list[list[str]],
        *,
        canary: bool,
        monitored: bool,
        state: ControlState,
        now_us: int,
    ) -> tuple[dict[int, LadderOutcome], _ShadowCall | None]:
        """One model call for every order with fresh features: their outcomes by index,
        and what a shadow call would need when the champion scored them."""
        rows = [model_row(orders[i].side.sign, values) for i, values in scorable.items()]
        call_reasons: list[str] = []
        attempts: list[Attempt] = []
        routed = await self._router.score(
            rows, budget, call_reasons, canary=canary, attempts=attempts, state=state, now_us=now_us
        )
        # The side's own first attempt: a challenger on-call forced open made none, and
        # the champion's answer must not count for it.
        first = next((a for a in attempts if (a.source is Source.CANARY) == canary), None)
        if monitored and self._canary is not None and first is not None:
            self._canary.record(
                CANARY if canary else CHAMPION,
                ok=first.ok,
                elapsed_ms=first.elapsed_ms,
                fell_back=routed is None,
                scores=routed.scores.scores
                if routed is not None and (routed.source is Source.CANARY) == canary
                else (),
            )
        if routed is None:
            for i in scorable:
                reasons[i].extend(call_reasons)
            return {}, None
        scores = routed.scores
        answered = f"{routed.source.name.lower()} answered in {scores.elapsed_ms:.1f} ms"
        scored_at_us = time.time_ns() // 1000
        entries = []
        outcomes = {}
        for i, score in zip(scorable, scores.scores, strict=True):
            reasons[i].extend([*call_reasons, answered])
            decision = model_decision(score, self._threshold)
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
        champion = routed.source is not Source.CANARY
        if champion:  # the challenger's own scores are no cached champion scores
            self._remember_scores(entries)
        shadow = None
        if champion and self._shadow is not None:
            shadow = _ShadowCall(rows, dict(zip(scorable, scores.scores, strict=True)))
        return outcomes, shadow

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
        """Lets in-flight cached-score writes and shadow calls finish (bounded), then
        cancels the rest."""
        if self._shadow is not None:
            await self._shadow.stop(timeout_s)
        if self._canary is not None:
            await self._canary.stop()
        pending = list(self._pending_writes)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            task.cancel()
