"""The ladder after the model: cached score (bounded age) → rules baseline → ABSTAIN.

Every step taken or passed over adds to the outcome's reasons, so the response says
why ("no cached score; rules: spread 12.0 bps > 10.0").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from core.deadline import Budget
from core.domain import Decision, OrderRequest, Source, model_decision
from core.store_reads import StoreReads
from fallback.rules import RulesBaseline
from fallback.score_cache import CachedScore, ScoreCache
from fallback.settings import FallbackSettings


@dataclass(frozen=True, slots=True)
class LadderInput:
    order: OrderRequest
    features: Sequence[float] | None  # fresh features, None when missing or stale


RULES_MODEL_NAME = "rules"
ABSTAIN_MODEL_NAME = "fallback"


@dataclass(frozen=True, slots=True)
class LadderOutcome:
    """A decision and where it came from: the model's, or a rung of the ladder's."""

    decision: Decision
    score: float | None
    threshold: float
    source: Source
    model_name: str
    model_version: str
    reasons: tuple[str, ...] = ()  # why, in the order the steps were taken

    def after(self, reasons: Sequence[str]) -> LadderOutcome:
        """This outcome, with ``reasons`` (what came before it) ahead of its own."""
        return dataclasses.replace(self, reasons=(*reasons, *self.reasons))


class FallbackChain:
    """RULES and ABSTAIN answers carry ``policy_version``: the sha256 of the ladder's
    configuration (rules thresholds, cached-score age bound, threshold), so they can be
    replayed like a model's."""

    def __init__(
        self,
        score_cache: ScoreCache,
        rules: RulesBaseline,
        *,
        cached_score_max_age_ms: float,
        model_threshold: float,
        redis_reads: StoreReads,
    ) -> None:
        self._score_cache = score_cache
        self._rules = rules
        self._max_age_ms = cached_score_max_age_ms
        self._model_threshold = model_threshold
        self._redis_reads = redis_reads
        policy = {
            "rules": rules.parameters(),
            "cached_score_max_age_ms": cached_score_max_age_ms,
            "model_threshold": model_threshold,
        }
        self.policy_version = hashlib.sha256(
            json.dumps(policy, sort_keys=True).encode()
        ).hexdigest()

    @classmethod
    def from_settings(
        cls,
        fallback: FallbackSettings,
        score_cache: ScoreCache,
        *,
        model_threshold: float,
        redis_reads: StoreReads,
    ) -> FallbackChain:
        rules = RulesBaseline(
            max_spread_bps=fallback.rules_max_spread_bps,
            max_volatility_bps=fallback.rules_max_volatility_bps,
            min_imbalance=fallback.rules_min_imbalance,
        )
        return cls(
            score_cache,
            rules,
            cached_score_max_age_ms=fallback.cached_score_max_age_ms,
            model_threshold=model_threshold,
            redis_reads=redis_reads,
        )

    async def decide_many(
        self, items: Sequence[LadderInput], budget: Budget, *, store_failure: str = ""
    ) -> list[LadderOutcome]:
        """The ladder's outcome for each item. ``store_failure`` says why this decision's
        feature read failed (timed out, busy, unreachable): the cached scores live in the
        same Redis, so they are not read then, and a sick Redis costs a decision one read
        cap rather than two (a paused Redis made answers late that way)."""
        keys = [(item.order.symbol, item.order.side) for item in items]
        if store_failure:
            skipped = f"cached score skipped: {store_failure}"
            return [self._decide(item, None, skipped) for item in items]
        known = self._score_cache.held(keys)
        failure = ""  # why the keys not held in memory have no score
        unknown = list(dict.fromkeys(key for key in keys if key not in known))
        if unknown:
            read = await self._redis_reads.read(
                lambda: self._score_cache.get_many(unknown), budget, what="cached score lookup"
            )
            if read.value is not None:
                known.update(zip(unknown, read.value, strict=True))
            failure = read.failure
        return [
            self._decide(item, known.get(key), "no cached score" if key in known else failure)
            for item, key in zip(items, keys, strict=True)
        ]

    def _decide(
        self, item: LadderInput, cached: CachedScore | None, missing_reason: str
    ) -> LadderOutcome:
        """Cached score, else rules, else ABSTAIN, with a reason for every step."""
        if cached is None:
            passed = missing_reason
        else:
            age_ms = cached.age_ms()
            if age_ms <= self._max_age_ms:
                return LadderOutcome(
                    model_decision(cached.score, self._model_threshold),
                    cached.score,
                    self._model_threshold,
                    Source.CACHED_SCORE,
                    cached.model_name,
                    cached.model_version,
                    (f"cached score {age_ms:.0f} ms old",),
                )
            passed = f"cached score {age_ms:.0f} ms old (max {self._max_age_ms:.0f})"
        if item.features is not None:
            verdict = self._rules.evaluate(item.order.side, item.features)
            return LadderOutcome(
                verdict.decision,
                verdict.score,
                verdict.threshold,
                Source.RULES,
                RULES_MODEL_NAME,
                self.policy_version,
                (passed, f"rules: {verdict.explanation}"),
            )
        return self.abstain((passed, "abstain: no fresh features for rules"))

    def abstain(self, reasons: Sequence[str] = ()) -> LadderOutcome:
        return LadderOutcome(
            Decision.ABSTAIN,
            None,
            self._model_threshold,
            Source.ABSTAIN,
            ABSTAIN_MODEL_NAME,
            self.policy_version,
            tuple(reasons),
        )
