"""The last good model score per (symbol, side), in Redis, for the ladder's first step."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions

from core.domain import Side, age_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CachedScore:
    score: float
    model_name: str
    model_version: str
    scored_at_us: int  # wall clock, µs since the epoch

    def age_ms(self, now_us: int | None = None) -> float:
        return age_ms(self.scored_at_us, now_us)


@dataclass(frozen=True, slots=True)
class ScoreEntry:
    symbol: str
    side: Side
    score: CachedScore


def score_key(prefix: str, symbol: str, side: Side) -> str:
    return f"{prefix}score:{symbol}:{side.name.lower()}"


ScoreKey = tuple[str, Side]

# Keys held in memory at most (the feature mirror takes up to 10,000 symbols: 20,000
# keys); when full, the expired entries go first, then, if none had expired, all (a
# symbol field a caller fills with anything must not grow it without bound).
MAX_HELD_SCORES = 32_768


def _newer(score: CachedScore | None, than: CachedScore | None) -> bool:
    """Whether ``score`` was scored after ``than`` (no score is older than any)."""
    if score is None:
        return False
    return than is None or score.scored_at_us > than.scored_at_us


# How long a server holds a cached score it read or computed before reading Redis
# again: shedding load or open breakers do not cost a Redis read per decision.
HELD_MS = 100.0
# A symbol and side's cached score is rewritten at most this often: a busy symbol does
# not cost a Redis write per decision.
WRITE_INTERVAL_MS = 100.0
# Cached scores live a few times their useful age: a ladder read finds a stale one (and
# says how stale) rather than none.
TTL_FACTOR = 4


class ScoreCache:
    """Writes scores with a TTL (a few times their useful age) and reads them in one
    pipeline, through a copy in this process's memory: a key read from Redis less than
    ``held_ms`` ago (found or not) is answered from memory, and the scores this process
    computes are held as they are made (``hold``). So a server shedding load, or with its
    breakers open, reads a busy key from Redis about once every ``held_ms`` (reads that
    miss together are not merged) instead of once per decision; a held score, or a held
    absence, can be up to ``held_ms`` behind what another server wrote meanwhile (the
    ladder still judges a score's age from when it was scored)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str,
        ttl_ms: int,
        held_ms: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._ttl_ms = ttl_ms
        self._held_s = held_ms / 1000.0
        self._clock = clock
        self._held: dict[ScoreKey, tuple[float, CachedScore | None]] = {}

    @classmethod
    def for_ladder(
        cls, client: aioredis.Redis, *, key_prefix: str, max_age_ms: float
    ) -> ScoreCache:
        """The server's cache of the scores the ladder uses up to ``max_age_ms`` old."""
        ttl_ms = int(max_age_ms * TTL_FACTOR)
        return cls(client, key_prefix=key_prefix, ttl_ms=ttl_ms, held_ms=HELD_MS)

    def held(self, keys: Sequence[ScoreKey]) -> dict[ScoreKey, CachedScore | None]:
        """The keys whose score (or its absence) this process knows from less than
        ``held_ms`` ago, without a Redis read."""
        if self._held_s <= 0:
            return {}
        oldest = self._clock() - self._held_s
        known = {}
        for key in keys:
            entry = self._held.get(key)
            if entry is not None and entry[0] > oldest:
                known[key] = entry[1]
        return known

    def hold(self, entries: Sequence[ScoreEntry]) -> None:
        """Scores this process just computed: held as if read from Redis now."""
        self._remember_held([((e.symbol, e.side), e.score) for e in entries])

    def _remember_held(self, found: Sequence[tuple[ScoreKey, CachedScore | None]]) -> None:
        """Holds each key's score as of now, unless a newer one is held already: a Redis
        read that was out while this process scored the key must not put back the older
        score (or its absence)."""
        if self._held_s <= 0:
            return
        now = self._clock()
        for key, score in found:
            entry = self._held.get(key)
            if entry is None:
                self._make_room(now)
            elif _newer(entry[1], than=score) and entry[0] > now - self._held_s:
                continue
            self._held[key] = (now, score)

    def _make_room(self, now: float) -> None:
        if len(self._held) < MAX_HELD_SCORES:
            return
        oldest = now - self._held_s
        for key in [k for k, (at, _) in self._held.items() if at <= oldest]:
            del self._held[key]
        if len(self._held) >= MAX_HELD_SCORES:
            self._held.clear()

    async def put_many(self, entries: Sequence[ScoreEntry]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in entries:
                doc = {
                    "s": entry.score.score,
                    "m": entry.score.model_name,
                    "v": entry.score.model_version,
                    "t": entry.score.scored_at_us,
                }
                pipe.set(
                    score_key(self._prefix, entry.symbol, entry.side),
                    json.dumps(doc, separators=(",", ":")),
                    px=self._ttl_ms,
                )
            await pipe.execute()

    async def get_many(self, keys: Sequence[ScoreKey]) -> list[CachedScore | None]:
        """The keys' scores as Redis holds them now (held in memory for ``held_ms``)."""
        names = [score_key(self._prefix, symbol, side) for symbol, side in keys]
        if len(names) == 1:  # a plain command costs ~40 µs less than a pipeline of one
            scores = [_decode(await self._client.get(names[0]))]
        else:
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.get(name)
                raws = await pipe.execute()
            scores = [_decode(raw) for raw in raws]
        self._remember_held(list(zip(keys, scores, strict=True)))
        return scores


# Past this many writes in flight (Redis slow or down) new ones are dropped: the cache is
# best-effort, and the Redis connections are for the decisions' reads.
MAX_PENDING_SCORE_WRITES = 8
SCORE_WRITE_TIMEOUT_S = 1.0


class ScoreWriter:
    """Keeps the cached scores current from the model's answers, off the critical path.

    ``remember`` returns at once: the write runs in a task of its own, and a key this
    server wrote less than ``write_interval_ms`` ago is not written again (at thousands of
    decisions per second on a few symbols, most writes would only repeat the last).
    """

    def __init__(self, cache: ScoreCache, *, write_interval_ms: float | None = None) -> None:
        """``write_interval_ms``: ``WRITE_INTERVAL_MS`` unless given."""
        self._cache = cache
        interval_ms = WRITE_INTERVAL_MS if write_interval_ms is None else write_interval_ms
        self._interval_us = int(interval_ms * 1000)
        self._written_at_us: dict[tuple[str, Side], int] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def remember(self, entries: Sequence[ScoreEntry]) -> None:
        self._cache.hold(entries)
        if len(self._pending) >= MAX_PENDING_SCORE_WRITES:
            return
        due = []
        for entry in entries:
            key = (entry.symbol, entry.side)
            scored_at = entry.score.scored_at_us
            if scored_at - self._written_at_us.get(key, 0) >= self._interval_us:
                self._written_at_us[key] = scored_at
                due.append(entry)
        if not due:
            return
        task = asyncio.create_task(self._write(due))
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("cached score write failed unexpectedly", exc_info=exc)

    async def _write(self, entries: list[ScoreEntry]) -> None:
        try:
            async with asyncio.timeout(SCORE_WRITE_TIMEOUT_S):
                await self._cache.put_many(entries)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            log.warning("cached score write failed: %r", exc)

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Lets writes in flight finish (bounded), then cancels the rest."""
        if not self._pending:
            return
        _, late = await asyncio.wait(list(self._pending), timeout=timeout_s)
        for task in late:
            task.cancel()


def _decode(raw: bytes | str | None) -> CachedScore | None:
    """The cached score, or None when there is none or it is unreadable."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        return CachedScore(float(doc["s"]), str(doc["m"]), str(doc["v"]), int(doc["t"]))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("unreadable cached score: %r", exc)
        return None
