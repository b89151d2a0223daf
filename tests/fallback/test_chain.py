"""The ladder (pure logic, over a fake score cache): its order, cached score → rules →
ABSTAIN, what each step says, and its policy version."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any, cast

import pytest
import redis.exceptions

from core.deadline import Budget
from core.domain import Decision, OrderRequest, Side, Source
from core.store_reads import StoreReads
from fallback.chain import FallbackChain, LadderInput
from fallback.rules import RulesBaseline
from fallback.score_cache import CachedScore, ScoreCache
from feature_cache.schema import FEATURE_INDEX, FEATURE_NAMES

pytestmark = pytest.mark.timed  # budgets of a few ms, spent while the test runs


class FakeScoreCache:
    """Answers every lookup with ``score``, and counts the lookups."""

    def __init__(self, score: CachedScore | None) -> None:
        self.score = score
        self.lookups = 0

    def held(self, keys: Sequence[tuple[str, Side]]) -> dict[tuple[str, Side], CachedScore | None]:
        return {}  # nothing held in memory: every lookup reads

    async def get_many(self, keys: Sequence[tuple[str, Side]]) -> list[CachedScore | None]:
        self.lookups += 1
        return [self.score] * len(keys)


def chain(
    max_spread_bps: float = 10.0, max_age_ms: float = 1000.0, cache: Any = None
) -> FallbackChain:
    return FallbackChain(
        cast(ScoreCache, cache),
        RulesBaseline(max_spread_bps=max_spread_bps, max_volatility_bps=25, min_imbalance=0.1),
        cached_score_max_age_ms=max_age_ms,
        model_threshold=0.55,
        redis_reads=StoreReads(cap_ms=10.0, max_abandoned=32),
    )


def cached(score: float, age_ms: float) -> CachedScore:
    now_us = time.time_ns() // 1000
    return CachedScore(score, "champion", "v1", now_us - int(age_ms * 1000))


def calm_book() -> list[float]:
    """Features the rules trade a buy on: tight spread, calm, bids leaning in."""
    values = [0.0] * len(FEATURE_NAMES)
    values[FEATURE_INDEX["spread_bps"]] = 1.0
    values[FEATURE_INDEX["imbalance_l5"]] = 0.5
    return values


def item(features: Sequence[float] | None) -> LadderInput:
    return LadderInput(OrderRequest("r1", "BTC-USD", Side.BUY, 1.0), features)


async def test_a_fresh_cached_score_decides_first():
    ladder = chain(cache=FakeScoreCache(cached(0.9, age_ms=100)))
    [outcome] = await ladder.decide_many([item(calm_book())], Budget(50))
    assert (outcome.source, outcome.decision, outcome.score) == (
        Source.CACHED_SCORE,
        Decision.TRADE,
        0.9,
    )
    assert len(outcome.reasons) == 1
    assert re.fullmatch(r"cached score \d+ ms old", outcome.reasons[0])


async def test_a_stale_cached_score_passes_to_the_rules_then_abstain():
    ladder = chain(cache=FakeScoreCache(cached(0.9, age_ms=5000)))
    ruled, abstained = await ladder.decide_many([item(calm_book()), item(None)], Budget(50))
    assert (ruled.source, ruled.decision) == (Source.RULES, Decision.TRADE)
    assert ruled.model_version == ladder.policy_version
    assert re.fullmatch(r"cached score \d+ ms old \(max 1000\)", ruled.reasons[0])
    assert ruled.reasons[1].startswith("rules: ")
    assert (abstained.source, abstained.decision) == (Source.ABSTAIN, Decision.ABSTAIN)
    assert abstained.reasons[-1] == "abstain: no fresh features for rules"


async def test_no_cached_score_goes_to_the_rules():
    ladder = chain(cache=FakeScoreCache(None))
    [outcome] = await ladder.decide_many([item(calm_book())], Budget(50))
    assert outcome.source is Source.RULES
    assert outcome.reasons[0] == "no cached score"


class FailingScoreCache:
    def held(self, keys: Sequence[tuple[str, Side]]) -> dict[tuple[str, Side], CachedScore | None]:
        return {}  # nothing held in memory: every lookup reads

    async def get_many(self, keys: Sequence[tuple[str, Side]]) -> list[CachedScore | None]:
        raise redis.exceptions.ConnectionError("connection refused")


async def test_a_failed_cached_score_lookup_goes_to_the_rules_and_says_why():
    ladder = chain(cache=FailingScoreCache())
    ruled, abstained = await ladder.decide_many([item(calm_book()), item(None)], Budget(50))
    assert (ruled.source, abstained.source) == (Source.RULES, Source.ABSTAIN)
    assert ruled.reasons[0] == "cached score lookup unavailable (ConnectionError)"
    assert abstained.reasons == (
        "cached score lookup unavailable (ConnectionError)",
        "abstain: no fresh features for rules",
    )


async def test_no_budget_left_skips_the_cached_score_lookup():
    cache = FakeScoreCache(cached(0.9, age_ms=100))
    [outcome] = await chain(cache=cache).decide_many([item(calm_book())], Budget(-1))
    assert cache.lookups == 0
    assert outcome.source is Source.RULES
    assert outcome.reasons[0] == "cached score lookup skipped: no budget left"


async def test_a_failed_feature_read_skips_the_cached_score_in_the_same_redis():
    cache = FakeScoreCache(cached(0.9, age_ms=100))
    ladder = chain(cache=cache)
    [outcome] = await ladder.decide_many(
        [item(None)], Budget(50), store_failure="feature store timed out after 10.0 ms"
    )
    assert cache.lookups == 0
    assert outcome.source is Source.ABSTAIN
    assert outcome.reasons[0] == "cached score skipped: feature store timed out after 10.0 ms"


def test_policy_version_is_stable_and_changes_with_any_setting():
    assert chain().policy_version == chain().policy_version
    assert len(chain().policy_version) == 64
    assert chain(max_spread_bps=12).policy_version != chain().policy_version
    assert chain(max_age_ms=500).policy_version != chain().policy_version
