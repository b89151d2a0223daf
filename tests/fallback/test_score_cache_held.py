"""The cached scores' copy in memory (pure logic: no Redis is reached): what it holds,
for how long, what a late read may not overwrite, and its bound."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from core.domain import Side
from fallback.score_cache import (
    HELD_MS,
    MAX_HELD_SCORES,
    ScoreCache,
    ScoreEntry,
    ScoreWriter,
)
from fallback.settings import FallbackSettings
from tests.fallback.scores import BUY, Clock, score


def cache(clock: Clock, held_ms: float = 100.0) -> ScoreCache:
    # A client nothing is sent to: these tests never read or write Redis.
    return ScoreCache(
        aioredis.Redis(port=9), key_prefix="held:", ttl_ms=60_000, held_ms=held_ms, clock=clock
    )


def test_a_read_that_returns_after_this_process_scored_the_key_keeps_the_newer_score():
    clock = Clock()
    scores = cache(clock)
    fresh = score(0.9)
    scores.hold([ScoreEntry(*BUY, fresh)])
    # A Redis read that was out meanwhile comes back with an older score, or none.
    scores._remember_held([(BUY, score(0.2, age_ms=50))])
    assert scores.held([BUY]) == {BUY: fresh}
    scores._remember_held([(BUY, None)])
    assert scores.held([BUY]) == {BUY: fresh}
    # Once the held score has expired, what Redis says is taken again.
    clock.now += 0.2
    older = score(0.2, age_ms=50)
    scores._remember_held([(BUY, older)])
    assert scores.held([BUY]) == {BUY: older}


def test_a_newer_score_read_from_redis_replaces_the_held_one():
    clock = Clock()
    scores = cache(clock)
    scores.hold([ScoreEntry(*BUY, score(0.9, age_ms=50))])
    newer = score(0.3)
    scores._remember_held([(BUY, newer)])
    assert scores.held([BUY]) == {BUY: newer}


async def test_the_writer_holds_every_score_it_is_given_even_those_it_does_not_write():
    clock = Clock()
    scores = cache(clock)
    writer = ScoreWriter(scores, write_interval_ms=60_000)
    first, second = score(0.6), score(0.7)
    writer.remember([ScoreEntry(*BUY, first)])
    writer.remember([ScoreEntry(*BUY, second)])  # within the write interval: not written
    assert scores.held([BUY]) == {BUY: second}
    await writer.stop(timeout_s=0.5)  # the one write (to nowhere) is let go


def test_the_copy_is_bounded_and_drops_the_expired_first():
    clock = Clock()
    scores = cache(clock)
    for n in range(MAX_HELD_SCORES):
        scores.hold([ScoreEntry(f"OLD{n}", Side.BUY, score(0.5))])
    clock.now += 0.2  # all of them expired
    scores.hold([ScoreEntry("HOT", Side.BUY, score(0.5))])
    assert len(scores._held) == 1
    # Full of live entries: updating one held already takes no room; a new key clears.
    for n in range(MAX_HELD_SCORES - 1):
        scores.hold([ScoreEntry(f"LIVE{n}", Side.BUY, score(0.5))])
    assert len(scores._held) == MAX_HELD_SCORES
    scores.hold([ScoreEntry("HOT", Side.BUY, score(0.6))])
    assert len(scores._held) == MAX_HELD_SCORES
    scores.hold([ScoreEntry("NEW", Side.BUY, score(0.6))])
    assert len(scores._held) == 1


def test_a_cached_scores_useful_age_must_outlast_its_hold_in_memory():
    with pytest.raises(ValidationError, match="cached_score_max_age_ms"):
        FallbackSettings(cached_score_max_age_ms=HELD_MS)


def test_nothing_is_held_with_held_ms_0():
    scores = cache(Clock(), held_ms=0)
    scores.hold([ScoreEntry(*BUY, score(0.8))])
    assert scores.held([BUY]) == {}
