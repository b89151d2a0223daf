"""The last good model score per (symbol, side), in Redis, for the ladder's first step."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from core.domain import Side

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CachedScore:
    score: float
    model_name: str
    model_version: str
    scored_at_us: int  # wall clock, µs since the epoch

    def age_ms(self, now_us: int | None = None) -> float:
        now = time.time_ns() // 1000 if now_us is None else now_us
        return max(0.0, (now - self.scored_at_us) / 1000.0)


@dataclass(frozen=True, slots=True)
class ScoreEntry:
    symbol: str
    side: Side
    score: CachedScore


def score_key(prefix: str, symbol: str, side: Side) -> str:
    return f"{prefix}score:{symbol}:{side.name.lower()}"


class ScoreCache:
    """Writes scores with a TTL (a few times their useful age) and reads them in one pipeline."""

    def __init__(self, client: aioredis.Redis, *, key_prefix: str, ttl_ms: int) -> None:
        self._client = client
        self._prefix = key_prefix
        self._ttl_ms = ttl_ms

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

    async def get_many(self, keys: Sequence[tuple[str, Side]]) -> list[CachedScore | None]:
        names = [score_key(self._prefix, symbol, side) for symbol, side in keys]
        if len(names) == 1:  # a plain command costs ~40 µs less than a pipeline of one
            return [_decode(await self._client.get(names[0]))]
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(name)
            raws = await pipe.execute()
        return [_decode(raw) for raw in raws]


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
