"""The cached scores' copy in memory, over a real redis-server: a key read or computed
less than ``held_ms`` ago is answered without a Redis read; past that, Redis again."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from core.deadline import Budget
from core.domain import OrderRequest, Side, Source
from core.store_reads import StoreReads
from fallback.chain import FallbackChain, LadderInput
from fallback.rules import RulesBaseline
from fallback.score_cache import ScoreCache, ScoreEntry
from tests.fallback.scores import BUY, Clock, score

pytestmark = pytest.mark.integration


def ladder(cache: ScoreCache) -> FallbackChain:
    return FallbackChain(
        cache,
        RulesBaseline(max_spread_bps=10, max_volatility_bps=25, min_imbalance=0.1),
        cached_score_max_age_ms=1000.0,
        model_threshold=0.55,
        redis_reads=StoreReads(cap_ms=50.0, max_abandoned=8),
    )


async def test_a_key_read_from_redis_is_held_for_held_ms_then_read_again(
    redis_client: aioredis.Redis, key_prefix: str
):
    clock = Clock()
    cache = ScoreCache(redis_client, key_prefix=key_prefix, ttl_ms=60_000, held_ms=100, clock=clock)
    writer = ScoreCache(redis_client, key_prefix=key_prefix, ttl_ms=60_000)
    await writer.put_many([ScoreEntry(*BUY, score(0.7))])
    assert cache.held([BUY]) == {}
    [first] = await cache.get_many([BUY])
    assert first is not None and first.score == 0.7

    # Another server writes a newer score: within held_ms this process keeps its copy.
    await writer.put_many([ScoreEntry(*BUY, score(0.2))])
    clock.now += 0.099
    held = cache.held([BUY])
    assert held == {BUY: first}
    [outcome] = await ladder(cache).decide_many([buy()], Budget(50))
    assert (outcome.source, outcome.score) == (Source.CACHED_SCORE, 0.7)

    clock.now += 0.002  # past held_ms: read from Redis again
    assert cache.held([BUY]) == {}
    [outcome] = await ladder(cache).decide_many([buy()], Budget(50))
    assert (outcome.source, outcome.score) == (Source.CACHED_SCORE, 0.2)


async def test_a_key_redis_has_no_score_for_is_held_as_none(
    redis_client: aioredis.Redis, key_prefix: str
):
    cache = ScoreCache(redis_client, key_prefix=key_prefix, ttl_ms=60_000, held_ms=10_000)
    [outcome] = await ladder(cache).decide_many([buy()], Budget(50))
    assert outcome.reasons[0] == "no cached score"
    assert cache.held([BUY]) == {BUY: None}
    # Redis is not asked again: a score written there now is not seen until held_ms ends.
    await ScoreCache(redis_client, key_prefix=key_prefix, ttl_ms=60_000).put_many(
        [ScoreEntry(*BUY, score(0.9))]
    )
    [outcome] = await ladder(cache).decide_many([buy()], Budget(50))
    assert outcome.source is Source.ABSTAIN
    assert outcome.reasons[0] == "no cached score"


async def test_scores_this_process_computes_are_held_without_a_read(
    redis_client: aioredis.Redis, key_prefix: str
):
    # A client whose every command fails: nothing here may reach Redis.
    dead = aioredis.Redis(port=9, socket_connect_timeout=0.05)
    try:
        cache = ScoreCache(dead, key_prefix=key_prefix, ttl_ms=60_000, held_ms=1000)
        cache.hold([ScoreEntry(*BUY, score(0.8))])
        [outcome] = await ladder(cache).decide_many([buy()], Budget(50))
        assert (outcome.source, outcome.score) == (Source.CACHED_SCORE, 0.8)
        # A key not held does read, and says why it found nothing.
        [other] = await ladder(cache).decide_many([buy("ETH-USD")], Budget(50))
        assert other.reasons[0].startswith("cached score lookup "), other.reasons
    finally:
        await dead.aclose()


async def test_held_ms_0_reads_redis_every_time(redis_client: aioredis.Redis, key_prefix: str):
    cache = ScoreCache(redis_client, key_prefix=key_prefix, ttl_ms=60_000, held_ms=0)
    cache.hold([ScoreEntry(*BUY, score(0.8))])
    await cache.get_many([BUY])
    assert cache.held([BUY]) == {}


def buy(symbol: str = "BTC-USD") -> LadderInput:
    return LadderInput(OrderRequest("r1", symbol, Side.BUY, 1.0), None)
