"""The ladder after the model: cached score (bounded age) → rules baseline → ABSTAIN.

Every step taken or passed over appends to the order's reasons, so the response says
why ("no cached score; rules: spread 12.0 bps > 10.0").
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis.exceptions

from core.deadline import Budget, StoreBusy, StoreReads
from core.domain import Decision, OrderRequest, Source, model_decision
from fallback.rules import RulesBaseline
from fallback.score_cache import CachedScore, ScoreCache

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LadderInput:
    order: OrderRequest
    features: Sequence[float] | None  # fresh features, None when missing or stale
    reasons: list[str]


RULES_MODEL_NAME = "rules"
ABSTAIN_MODEL_NAME = "fallback"


@dataclass(frozen=True, slots=True)
class LadderOutcome:
    decision: Decision
    score: float | None
    threshold: float
    source: Source
    model_name: str
    model_version: str


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

    async def decide_many(
        self, items: Sequence[LadderInput], budget: Budget, *, store_failure: str = ""
    ) -> list[LadderOutcome]:
        """The ladder's outcome for each item. ``store_failure`` says why this decision's
        feature read failed (timed out, busy, unreachable): the cached scores live in the
        same Redis, so they are not read then, and a sick Redis costs a decision one read
        cap rather than two (a paused Redis made answers late that way)."""
        cached: Sequence[CachedScore | None]
        if store_failure:
            cached, problem = [None] * len(items), f"cached score skipped: {store_failure}"
        else:
            cached, problem = await self._cached_scores(items, budget)
        return [
            self._decide(item, score, problem) for item, score in zip(items, cached, strict=True)
        ]

    async def _cached_scores(
        self, items: Sequence[LadderInput], budget: Budget
    ) -> tuple[Sequence[CachedScore | None], str]:
        """The cached scores, or Nones and why the lookup did not happen or failed."""
        left_ms = self._redis_reads.timeout_ms(budget)
        if left_ms <= 0:
            problem = "cached score skipped: no budget left"
        else:
            try:
                keys = [(item.order.symbol, item.order.side) for item in items]
                cached = await self._redis_reads.run(self._score_cache.get_many(keys), left_ms)
                return cached, "no cached score"
            except TimeoutError:
                problem = f"cached score lookup timed out after {left_ms:.1f} ms"
            except StoreBusy as exc:
                problem = f"cached score store busy: {exc}"
            except (redis.exceptions.RedisError, OSError) as exc:
                problem = f"cached score unavailable ({type(exc).__name__})"
                log.warning("score cache read failed: %s", exc)
        return [None] * len(items), problem

    def _decide(
        self, item: LadderInput, cached: CachedScore | None, missing_reason: str
    ) -> LadderOutcome:
        if cached is None:
            item.reasons.append(missing_reason)
        else:
            age_ms = cached.age_ms()
            if age_ms <= self._max_age_ms:
                item.reasons.append(f"cached score {age_ms:.0f} ms old")
                decision = model_decision(cached.score, self._model_threshold)
                return LadderOutcome(
                    decision,
                    cached.score,
                    self._model_threshold,
                    Source.CACHED_SCORE,
                    cached.model_name,
                    cached.model_version,
                )
            item.reasons.append(f"cached score {age_ms:.0f} ms old (max {self._max_age_ms:.0f})")
        if item.features is not None:
            verdict = self._rules.evaluate(item.order.side, item.features)
            item.reasons.append(f"rules: {verdict.explanation}")
            return LadderOutcome(
                verdict.decision,
                verdict.score,
                verdict.threshold,
                Source.RULES,
                RULES_MODEL_NAME,
                self.policy_version,
            )
        item.reasons.append("abstain: no fresh features for rules")
        return self.abstain()

    def abstain(self) -> LadderOutcome:
        return LadderOutcome(
            Decision.ABSTAIN,
            None,
            self._model_threshold,
            Source.ABSTAIN,
            ABSTAIN_MODEL_NAME,
            self.policy_version,
        )
