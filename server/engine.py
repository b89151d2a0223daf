"""The decision engine: kill switch → features → model (primary, one retry) → fallback ladder.

Transport-agnostic: it takes validated ``OrderRequest``s and a ``Budget`` and returns
``DecisionResult``s, each recorded in the audit journal first; the gRPC servicer only
converts. A single order is a batch of one, so Decide and DecideBatch share every step.
The engine only orchestrates: each step (``FeatureSource``, ``Traffic``, the ladder)
returns a result with its reasons, and the engine composes them. The steps in order:
docs/architecture.md#inside-the-server-one-decide.
"""

from __future__ import annotations

import collections
import random
import time
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
    Reason,
    Source,
    model_decision,
)
from core.histogram import LATENCY_BOUNDS_S, Buckets
from core.ids import new_decision_id
from core.logs import deciding
from fallback.chain import FallbackChain, LadderInput, LadderOutcome
from fallback.score_cache import CachedScore, ScoreEntry, ScoreWriter
from feature_cache.schema import model_row
from server.audit.trail import DecisionAudit
from server.control.flags import SHADOW_SAMPLE_RATE
from server.control.state import GLOBAL_SCOPE, ControlState
from server.drift import DriftMonitor
from server.features import FeatureSnapshot, FeatureSource
from server.router import RouteResult
from server.settings import DecisionSettings
from server.shadow import Shadowed, ShadowScorer
from server.tracing import NO_TRACER
from server.traffic import Traffic

NO_FEATURES = FeatureSnapshot(None)
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


@dataclass(slots=True)
class _Order:
    """One order's way through a decision call: each step fills in what it found."""

    order: OrderRequest
    decision_id: str
    features: FeatureSnapshot = NO_FEATURES
    row: list[float] | None = None  # the model's input, when the features are usable
    outcome: LadderOutcome | None = None  # None until a step decided it
    reason_code: Reason = Reason.MODEL_ANSWERED

    def result(self, timings: tuple[int, int, int], decided_at_ns: int) -> DecisionResult:
        """The decision; ``timings``: the call's features, model and total µs."""
        outcome = self.outcome
        if outcome is None:
            raise RuntimeError("an order left undecided: every step must decide or pass it on")
        features_us, model_us, total_us = timings
        return DecisionResult(
            request_id=self.order.request_id,
            decision_id=self.decision_id,
            decision=outcome.decision,
            score=outcome.score,
            threshold=outcome.threshold,
            source=outcome.source,
            model_name=outcome.model_name,
            model_version=outcome.model_version,
            reason="; ".join(outcome.reasons),
            feature_age_ms=self.features.age_ms,
            features_us=features_us,
            model_us=model_us,
            total_us=total_us,
            decided_at_ns=decided_at_ns,
            feature_time_us=self.features.event_time_us,
            reason_code=self.reason_code,
        )


# Verified callers counted by name in the metrics; the rest share OTHER_CALLERS (a label
# per certificate would grow without bound).
MAX_CALLER_LABELS = 50
OTHER_CALLERS = "other"
# The same for symbols in the decisions that fell to the ladder for their features.
MAX_SYMBOL_LABELS = 50
OTHER_SYMBOLS = "other"
FEATURE_REASONS = frozenset(
    {Reason.NO_FEATURES, Reason.FEATURES_STALE, Reason.FEATURES_UNUSABLE, Reason.FEATURE_STORE}
)


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
        # Decisions not the model's, by who decided and why.
        self.fallbacks: collections.Counter[tuple[Source, Reason]] = collections.Counter()
        # Decisions by verified caller (mTLS), at most MAX_CALLER_LABELS of them by name.
        self.callers: collections.Counter[str] = collections.Counter()
        # Decisions the ladder made for want of features, by symbol (at most
        # MAX_SYMBOL_LABELS by name) and reason: whose market data is missing or stale.
        self.feature_fallbacks: collections.Counter[tuple[str, Reason]] = collections.Counter()
        self._named_symbols: set[str] = set()
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
            fallbacks[reason.label] += count
        latency = {s.name.lower(): b.counts() for s, b in self.latency.items() if b.count}
        return Tally(sum(by_source.values()), dict(by_source), dict(fallbacks), latency)

    async def decide(
        self, orders: Sequence[OrderRequest], budget: Budget, call: CallInfo
    ) -> list[DecisionResult]:
        """Decides every order and records them in the audit journal before returning;
        raises ``AuditUnavailable`` (and returns nothing) when they cannot be recorded."""
        self._in_flight += len(orders)
        self._calls_in_flight += 1
        if call.verified:
            self._count_caller(call.caller, len(orders))
        # The ids come first, so that every log line of the decision carries them.
        ids = [new_decision_id() for _ in orders]
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
        state = self._control()  # once per call: every order of a batch sees the same levers
        now_us = time.time_ns() // 1000
        todo = [_Order(order, decision_id) for order, decision_id in zip(orders, ids, strict=True)]
        for item in todo:
            self._kill_switch(item, state, now_us)
        wanted = [item for item in todo if item.outcome is None]
        store_failure = await self._read_features(wanted, budget)
        features_done = time.perf_counter_ns()

        scorable = [item for item in wanted if item.row is not None]
        routed = await self._score(scorable, budget, state, now_us) if scorable else None
        model_done = time.perf_counter_ns()

        pending = [item for item in wanted if item.outcome is None]
        if pending:
            await self._fall_back(pending, budget, store_failure, routed)

        finished = time.perf_counter_ns()
        timings = (
            (features_done - started) // 1000,
            (model_done - features_done) // 1000,
            (finished - started) // 1000,
        )
        decided_at = time.time_ns()
        results = [item.result(timings, decided_at) for item in todo]
        values = [item.features.values for item in todo]
        with self._tracer.start_as_current_span("audit.journal_append"):
            self._audit.record_decisions(call, orders, values, results)
        request_span = trace.get_current_span()
        if request_span.is_recording():
            request_span.set_attribute("decision.id", ids[0])
            request_span.set_attribute("decision.count", len(ids))
            request_span.set_attribute("decision.source", results[0].source.name.lower())
        self._tally(orders, results)
        answer = routed.answer if routed is not None else None
        # The challenger's (a canary's) are no champion scores.
        champion = answer.scores if answer and answer.source is not Source.CANARY else None
        if self._drift is not None:
            self._drift.observe(
                values,
                champion.scores if champion else (),
                champion.model_version if champion else "",
            )
        if champion is not None:
            self._shadow_sample(scorable, champion.scores, state, now_us)
        return results

    def _kill_switch(self, item: _Order, state: ControlState, now_us: int) -> None:
        """ABSTAIN when an engaged kill switch covers the order's symbol."""
        if not state.entries:
            return
        switch = state.kill_switch(item.order.symbol, now_us)
        if switch is None:
            return
        scope, change = switch
        what = "all symbols" if scope == GLOBAL_SCOPE else scope
        item.outcome = self._ladder.abstain(
            (f"kill switch for {what} engaged by {change.changed_by}: {change.reason}",)
        )
        item.reason_code = Reason.KILL_SWITCH

    async def _read_features(self, items: Sequence[_Order], budget: Budget) -> str:
        """Each order's features (and its model row, when they are usable); why the
        store did not answer, "" when it did."""
        with self._tracer.start_as_current_span("decision.features") as span:
            read = await self._features.read([item.order for item in items], budget)
            span.set_attribute("decision.orders", len(items))
            span.set_attribute(
                "decision.features.missing", sum(s.values is None for s in read.snapshots)
            )
        for item, snapshot in zip(items, read.snapshots, strict=True):
            item.features = snapshot
            if snapshot.values is not None:
                item.row = model_row(item.order.side.sign, snapshot.values)
        return read.store_failure

    async def _score(
        self, items: Sequence[_Order], budget: Budget, state: ControlState, now_us: int
    ) -> RouteResult:
        """One model call for every row; each order the model answered gets its outcome.
        The champion's scores also go to the score cache, for the ladder."""
        rows = [item.row for item in items if item.row is not None]
        with self._tracer.start_as_current_span("decision.model") as span:
            routed = await self._traffic.score(rows, budget, state, now_us)
            span.set_attribute("decision.rows", len(items))
            span.set_attribute(
                "decision.answered_by",
                routed.answer.source.name.lower() if routed.answer else "none",
            )
        answer = routed.answer
        if answer is None:
            return routed
        scores = answer.scores
        answered = f"{answer.source.name.lower()} answered in {scores.elapsed_ms:.1f} ms"
        reasons = (*routed.reasons, answered)
        for item, score in zip(items, scores.scores, strict=True):
            item.outcome = LadderOutcome(
                model_decision(score, self._threshold),
                score,
                self._threshold,
                answer.source,
                scores.model_name,
                scores.model_version,
                reasons,
            )
        if answer.source is not Source.CANARY:  # the challenger's are no champion scores
            scored_at_us = time.time_ns() // 1000
            self._scores.remember(
                [
                    ScoreEntry(
                        item.order.symbol,
                        item.order.side,
                        CachedScore(score, scores.model_name, scores.model_version, scored_at_us),
                    )
                    for item, score in zip(items, scores.scores, strict=True)
                ]
            )
        return routed

    async def _fall_back(
        self,
        items: Sequence[_Order],
        budget: Budget,
        store_failure: str,
        routed: RouteResult | None,
    ) -> None:
        """The ladder's outcome for each order the model did not answer, after the reasons
        of what came before it (its features, the replicas tried)."""
        ladder = [LadderInput(item.order, item.features.values) for item in items]
        with self._tracer.start_as_current_span("decision.ladder") as span:
            decided = await self._ladder.decide_many(ladder, budget, store_failure=store_failure)
            span.set_attribute("decision.orders", len(items))
            span.set_attribute("decision.sources", sorted({o.source.name.lower() for o in decided}))
        for item, outcome in zip(items, decided, strict=True):
            features = item.features
            before = (features.reason,) if features.reason else ()
            if item.row is not None and routed is not None:  # the model was asked
                item.outcome = outcome.after((*before, *routed.reasons))
                item.reason_code = routed.failure or Reason.MODEL_ERROR
            else:
                item.outcome = outcome.after(before)
                item.reason_code = features.fallback or Reason.NO_FEATURES

    def _count_symbol(self, symbol: str, reason: Reason) -> None:
        if symbol not in self._named_symbols:
            if len(self._named_symbols) < MAX_SYMBOL_LABELS:
                self._named_symbols.add(symbol)
            else:
                symbol = OTHER_SYMBOLS
        self.feature_fallbacks[symbol, reason] += 1

    def _count_caller(self, caller: str, decisions: int) -> None:
        known = caller in self.callers or len(self.callers) < MAX_CALLER_LABELS
        self.callers[caller if known else OTHER_CALLERS] += decisions

    def _tally(self, orders: Sequence[OrderRequest], results: Sequence[DecisionResult]) -> None:
        for order, result in zip(orders, results, strict=True):
            self.decided[result.source, result.decision] += 1
            if result.reason_code is not Reason.MODEL_ANSWERED:
                self.fallbacks[result.source, result.reason_code] += 1
                if result.reason_code in FEATURE_REASONS:
                    self._count_symbol(order.symbol, result.reason_code)
            self.latency[result.source].observe(result.total_us / 1e6)
            if result.feature_age_ms >= 0:
                self.feature_age.observe(result.feature_age_ms / 1e3)

    def _shadow_sample(
        self,
        items: Sequence[_Order],
        scores: Sequence[float],
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
            Shadowed(
                item.decision_id,
                score,
                item.outcome is not None and item.outcome.decision is Decision.TRADE,
            )
            for item, score in zip(items, scores, strict=True)
        ]
        rows = [item.row for item in items if item.row is not None]
        self._shadow.submit(rows, shadowed, state, now_us)

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Lets in-flight shadow calls and cached-score writes finish (bounded), then
        cancels the rest."""
        if self._shadow is not None:
            await self._shadow.stop(timeout_s)
        await self._scores.stop(timeout_s)
