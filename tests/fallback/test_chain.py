"""The fallback policy's version (pure logic)."""

from __future__ import annotations

from typing import Any, cast

from core.deadline import StoreReads
from fallback.chain import FallbackChain
from fallback.rules import RulesBaseline
from fallback.score_cache import ScoreCache


def chain(max_spread_bps: float = 10.0, max_age_ms: float = 1000.0) -> FallbackChain:
    return FallbackChain(
        cast(ScoreCache, cast(Any, None)),  # the version never reads the cache
        RulesBaseline(max_spread_bps=max_spread_bps, max_volatility_bps=25, min_imbalance=0.1),
        cached_score_max_age_ms=max_age_ms,
        model_threshold=0.55,
        redis_reads=StoreReads(cap_ms=10.0, max_abandoned=32),
    )


def test_policy_version_is_stable_and_changes_with_any_setting():
    assert chain().policy_version == chain().policy_version
    assert len(chain().policy_version) == 64
    assert chain(max_spread_bps=12).policy_version != chain().policy_version
    assert chain(max_age_ms=500).policy_version != chain().policy_version
