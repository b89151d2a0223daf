"""The decision engine: kill switch → features → model (primary, one retry) → fallback ladder.

Transport-agnostic: it takes validated ``OrderRequest``s and a ``Budget`` and returns
``DecisionResult``s, each recorded in the audit journal first; the gRPC servicer only
converts. A single order is a batch of one, so Decide and DecideBatch share every step:
one Redis read for the features, one model call for all rows with fresh features, one
read for the cached scores.

The engine only orchestrates; each step returns a result it composes: the
``FeatureSource`` a snapshot per order, ``Traffic`` (champion or canary lane) a
``RouteResult``, the ladder an outcome per order, each with its reasons. The shared
control state is read once per call: an engaged kill switch makes the order ABSTAIN
before anything else; the shadow sample rate hands a champion-scored call's rows to the
``ShadowScorer`` after the decisions are recorded.
"""

from __future__ import annotations

import collections
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Tracer

from core.deadline import Budget
from core.domain import (
    CallInfo,
    Decision,
    DecisionResult,
    OrderRequest,
    Source,
    model_decision,
)
from core.histogram import LATENCY_BOUNDS_S, Buckets
from core.logs import deciding
from fallback.chain import FallbackChain, LadderInput, LadderOutcome
from fallback.score_cache import CachedScore, ScoreEntry, ScoreWriter
from feature_cache.schema import model_row
from server.audit.trail import DecisionAudit
from server.control.flags import SHADOW_SAMPLE_RATE
from server.control.state import GLOBAL_SCOPE, ControlState
from server.drift import DriftMonitor
from server.features import FeatureSnapshot, FeatureSource
from server.router import RoutedScores
from server.settings import DecisionSettings
from server.shadow import Shadowed, ShadowScorer
from server.tracing import NO_TRACER
from server.traffic import Traffic

# Seconds: the features' age when a decision read them (stale is past 2 s by default).
FEATURE_AGE_BOUNDS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0)


@dataclass(frozen=True)
class Tally:
    """What the engine decided since it started, by source and by fallback reason."""

    decisions: int
    by_source: dict[str, int]  # "primary" -> n
    fallbacks: dict[str, int]  # reason code -> n
    # Answer times by source: observations per bucket of LATENCY_BOUNDS_S.
    latency_counts: dict[str, list[int]]


class DecisionEngine:
    def __init__(
        self,
        *,
        features: FeatureSource,
        traffic: Traffic,
        ladder: FallbackChain,
        scores: ScoreWriter,
        audit: DecisionAudit,
        decision: DecisionSettings,
        control: Callable[[], ControlState] = ControlState,
        shadow: ShadowScorer | None = None,
        drift: DriftMonitor | None = None,
        tracer: Tracer = NO_TRACER,
        rng: random.Random | None = None,
    ) -> None:
        self._features = features
        self._traffic = traffic
        self._ladder = ladder
        self._scores = scores
        self._audit = audit
        self._threshold = decision.threshold
        self._control = control
        self._shadow = shadow
        self._drift = drift
        self._tracer = tracer
        self._rng = rng or random.Random()  # noqa: S311 - sampling, not security
        self._in_flight = 0
        self._calls_in_flight = 0
        # Decisions made so far, by who decided and what, how long each took by who
        # decided, and how old the features they read were (read by the metrics).
        self.decided: collections.Counter[tuple[Source, Decision]] = collections.Counter()
        # Decisions not the model's, by who decided and why (FALLBACK_REASONS).
        self.fallbacks: collections.Counter[tuple[Source, str]] = collections.Counter()
        self.latency = {source: Buckets(LATENCY_BOUNDS_S) for source in Source}
        self.feature_age = Buckets(FEATURE_AGE_BOUNDS_S)

    @property
    def in_flight(self) -> int:
        """Decisions being made now (a DecideBatch call's orders each count)."""
        return self._in_flight

    @property
    def calls_in_flight(self) -> int:
        """Decide and DecideBatch calls being decided now."""
        return self._calls_in_flight

    def tally(self) -> Tally:
        by_source: collections.Counter[str] = collections.Counter()
        for (source, _), count in self.decided.items():
            by_source[source.name.lower()] += count
        fallbacks: collections.Counter[str] = collections.Counter()
        for (_, reason), count in self.fallbacks.items():
            fallbacks[reason] += count
        latency = {s.name.lower(): b.counts() for s, b in self.latency.items() if b.count}
        return Tally(sum(by_source.values()), dict(by_source), dict(fallbacks), latency)

    async def decide(
        self, orders: Sequence[OrderRequest], budget: Budget, call: CallInfo
    ) -> list[DecisionResult]:
        """Decides every order and records them in the audit journal before returning;
        raises ``AuditUnavailable`` (and returns nothing) when they cannot be recorded."""
        self._in_flight += len(orders)
        self._calls_in_flight += 1
        # The ids come first, so that every log line of the decision carries them.
        ids = [str(uuid.uuid4()) for _ in orders]
        try:
            with deciding(ids):
                return await self._decide(orders, ids, budget, call)
        finally:
            self._in_flight -= len(orders)
            self._calls_in_flight -= 1

    async def _decide(
        self,
        orders: Sequence[OrderRequest],
        ids: Sequence[str],
        budget: Budget,
        call: CallInfo,
    ) -> list[DecisionResult]:
        started = time.perf_counter_ns()
        state = self._control()
        now_us = time.time_ns() // 1000
        outcomes = self._kill_switched(orders, state, now_us)
        fallbacks = dict.fromkeys(outcomes, "kill_switch")  # why not the model, by index
        wanted = [i for i in range(len(orders)) if i not in outcomes]
        with self._tracer.start_as_current_span("decision.features") as span:
            read = await self._features.read([orders[i] for i in wanted], budget)
            span.set_attribute("decision.orders", len(wanted))
            span.set_attribute(
                "decision.features.missing", sum(s.values is None for s in read.snapshots)
            )
        features = dict.fromkeys(range(len(orders)), FeatureSnapshot(None))
        features.update(zip(wanted, read.snapshots, strict=True))
        features_done = time.perf_counter_ns()

        scorable = {i: v for i in wanted if (v := features[i].values) is not None}
        rows = [model_row(orders[i].side.sign, values) for i, values in scorable.items()]
        model_reasons: tuple[str, ...] = ()
        model_failure = ""  # why the model did not answer the scorable orders
        champion_scores: Sequence[float] = ()
        champion_version = ""
        if scorable:
            with self._tracer.start_as_current_span("decision.model") as span:
                routed = await self._traffic.score(rows, budget, state, now_us)
                span.set_attribute("decision.rows", len(rows))
                span.set_attribute(
                    "decision.answered_by",
                    routed.answer.source.name.lower() if routed.answer else "none",
                )
            model_reasons = routed.reasons
            model_failure = routed.failure or "model_error"
            if routed.answer is not None:
                outcomes.update(self._scored(orders, list(scorable), routed.answer, model_reasons))
                if routed.answer.source is not Source.CANARY:
                    champion_scores = routed.answer.scores.scores
                    champion_version = routed.answer.scores.model_version
        model_done = time.perf_counter_ns()

        pending = [i for i in wanted if i not in outcomes]
        if pending:
            ladder = [LadderInput(orders[i], features[i].values) for i in pending]
            with self._tracer.start_as_current_span("decision.ladder") as span:
                decided = await self._ladder.decide_many(
                    ladder, budget, store_failure=read.store_failure
                )
                span.set_attribute("decision.orders", len(pending))
                span.set_attribute(
                    "decision.sources", sorted({o.source.name.lower() for o in decided})
                )
            for i, outcome in zip(pending, decided, strict=True):
                before = (features[i].reason,) if features[i].reason else ()
                after_model = model_reasons if i in scorable else ()
                outcomes[i] = outcome.after((*before, *after_model))
                fallbacks[i] = (
                    model_failure if i in scorable else features[i].fallback or "no_features"
                )

        finished = time.perf_counter_ns()
        decided_at = time.time_ns()
        results = [
            DecisionResult(
                request_id=order.request_id,
                decision_id=ids[i],
                decision=outcomes[i].decision,
                score=outcomes[i].score,
                threshold=outcomes[i].threshold,
                source=outcomes[i].source,
                model_name=outcomes[i].model_name,
                model_version=outcomes[i].model_version,
                reason="; ".join(outcomes[i].reasons),
                feature_age_ms=features[i].age_ms,
                features_us=(features_done - started) // 1000,
                model_us=(model_done - features_done) // 1000,
                total_us=(finished - started) // 1000,
                decided_at_ns=decided_at,
                feature_time_us=features[i].event_time_us,
                fallback=fallbacks.get(i, ""),
            )
            for i, order in enumerate(orders)
        ]
        values = [features[i].values for i in range(len(orders))]
        with self._tracer.start_as_current_span("audit.journal_append"):
            self._audit.record_decisions(call, orders, values, results)
        request_span = trace.get_current_span()
        if request_span.is_recording():
            request_span.set_attribute("decision.id", ids[0])
            request_span.set_attribute("decision.count", len(ids))
            request_span.set_attribute("decision.source", results[0].source.name.lower())
        self._tally(results)
        if self._drift is not None:
            self._drift.observe(values, champion_scores, champion_version)
        if champion_scores:
            self._shadow_sample(list(scorable), rows, champion_scores, results, state, now_us)
        return results

    def _tally(self, results: Sequence[DecisionResult]) -> None:
        for result in results:
            self.decided[result.source, result.decision] += 1
            if result.fallback:
                self.fallbacks[result.source, result.fallback] += 1
            self.latency[result.source].observe(result.total_us / 1e6)
            if result.feature_age_ms >= 0:
                self.feature_age.observe(result.feature_age_ms / 1e3)

    def _kill_switched(
        self, orders: Sequence[OrderRequest], state: ControlState, now_us: int
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
            stopped[i] = self._ladder.abstain(
                (f"kill switch for {what} engaged by {change.changed_by}: {change.reason}",)
            )
        return stopped

    def _scored(
        self,
        orders: Sequence[OrderRequest],
        indexes: list[int],
        answer: RoutedScores,
        route_reasons: Sequence[str],
    ) -> dict[int, LadderOutcome]:
        """The model's outcome for each scored order, by index; the champion's scores
        also go to the score cache, for the ladder."""
        scores = answer.scores
        answered = f"{answer.source.name.lower()} answered in {scores.elapsed_ms:.1f} ms"
        reasons = (*route_reasons, answered)
        outcomes = {
            i: LadderOutcome(
                model_decision(score, self._threshold),
                score,
                self._threshold,
                answer.source,
                scores.model_name,
                scores.model_version,
                reasons,
            )
            for i, score in zip(indexes, scores.scores, strict=True)
        }
        if answer.source is not Source.CANARY:  # the challenger's are no champion scores
            scored_at_us = time.time_ns() // 1000
            self._scores.remember(
                [
                    ScoreEntry(
                        orders[i].symbol,
                        orders[i].side,
                        CachedScore(score, scores.model_name, scores.model_version, scored_at_us),
                    )
                    for i, score in zip(indexes, scores.scores, strict=True)
                ]
            )
        return outcomes

    def _shadow_sample(
        self,
        indexes: list[int],
        rows: Sequence[Sequence[float]],
        scores: Sequence[float],
        results: Sequence[DecisionResult],
        state: ControlState,
        now_us: int,
    ) -> None:
        """Hands a sampled champion-scored call to the challenger, off the critical path."""
        if self._shadow is None:
            return
        rate = state.flag_value(SHADOW_SAMPLE_RATE, now_us)
        if rate <= 0 or self._rng.random() >= rate:
            return
        shadowed = [
            Shadowed(results[i].decision_id, score, results[i].decision is Decision.TRADE)
            for i, score in zip(indexes, scores, strict=True)
        ]
        self._shadow.submit(rows, shadowed, state, now_us)

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Lets in-flight shadow calls and cached-score writes finish (bounded), then
        cancels the rest."""
        if self._shadow is not None:
            await self._shadow.stop(timeout_s)
        await self._scores.stop(timeout_s)
