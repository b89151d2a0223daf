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

from core.deadline import Budget
from core.domain import (
    CallInfo,
    Decision,
    DecisionResult,
    OrderRequest,
    Source,
    model_decision,
)
from fallback.chain import FallbackChain, LadderInput, LadderOutcome
from fallback.score_cache import CachedScore, ScoreEntry, ScoreWriter
from feature_cache.schema import model_row
from server.admission import AdmissionLimit
from server.audit.trail import DecisionAudit
from server.control.flags import SHADOW_SAMPLE_RATE
from server.control.state import GLOBAL_SCOPE, ControlState
from server.errors import Overloaded
from server.features import FeatureSnapshot, FeatureSource
from server.router import RoutedScores
from server.settings import DecisionSettings
from server.shadow import Shadowed, ShadowScorer
from server.traffic import Traffic


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
        admission: AdmissionLimit,
        shadow: ShadowScorer | None = None,
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
        self._rng = rng or random.Random()  # noqa: S311 - sampling, not security
        self._admission = admission
        self._shed_to_rules = decision.overload_action == "rules"
        self._in_flight = 0
        self.shed = 0  # decisions shed so far (rejected, or decided without the model)
        # Decisions made so far, by who decided and what (read by the metrics).
        self.decided: collections.Counter[tuple[Source, Decision]] = collections.Counter()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def decide(
        self, orders: Sequence[OrderRequest], budget: Budget, call: CallInfo
    ) -> list[DecisionResult]:
        """Decides every order and records them in the audit journal before returning;
        raises ``AuditUnavailable`` (and returns nothing) when they cannot be recorded,
        and ``Overloaded`` when shedding by rejection."""
        overloaded = not self._admission.admits(self._in_flight, len(orders))
        if overloaded:
            self.shed += len(orders)
            if not self._shed_to_rules:
                raise Overloaded(self._in_flight, self._admission.limit)
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
        outcomes = self._kill_switched(orders, state, now_us)
        wanted = [i for i in range(len(orders)) if i not in outcomes]
        read = await self._features.read([orders[i] for i in wanted], budget)
        features = dict.fromkeys(range(len(orders)), FeatureSnapshot(None))
        features.update(zip(wanted, read.snapshots, strict=True))
        features_done = time.perf_counter_ns()

        scorable = {i: v for i in wanted if (v := features[i].values) is not None}
        rows = [model_row(orders[i].side.sign, values) for i, values in scorable.items()]
        model_reasons: tuple[str, ...] = ()
        champion_scores: Sequence[float] = ()
        if scorable and overloaded:
            model_reasons = (f"overloaded: model skipped ({self._in_flight} in flight)",)
        elif scorable:
            routed = await self._traffic.score(rows, budget, state, now_us)
            model_reasons = routed.reasons
            if routed.answer is not None:
                outcomes.update(self._scored(orders, list(scorable), routed.answer, model_reasons))
                if routed.answer.source is not Source.CANARY:
                    champion_scores = routed.answer.scores.scores
        model_done = time.perf_counter_ns()

        pending = [i for i in wanted if i not in outcomes]
        if pending:
            ladder = [LadderInput(orders[i], features[i].values) for i in pending]
            decided = await self._ladder.decide_many(
                ladder, budget, store_failure=read.store_failure
            )
            for i, outcome in zip(pending, decided, strict=True):
                before = (features[i].reason,) if features[i].reason else ()
                after_model = model_reasons if i in scorable else ()
                outcomes[i] = outcome.after((*before, *after_model))

        finished = time.perf_counter_ns()
        decided_at = time.time_ns()
        results = [
            DecisionResult(
                request_id=order.request_id,
                decision_id=str(uuid.uuid4()),
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
            )
            for i, order in enumerate(orders)
        ]
        values = [features[i].values for i in range(len(orders))]
        self._audit.record_decisions(call, orders, values, results)
        self.decided.update((r.source, r.decision) for r in results)
        if champion_scores:
            self._shadow_sample(list(scorable), rows, champion_scores, results, state, now_us)
        return results

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
