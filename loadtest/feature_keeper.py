"""Keeps feature records fresh without Kafka, for benchmarks of the decision path alone:
a seeded random walk per symbol, written through the consumer's ``FeatureWriter``
(monotonic, with a TTL), so Decide sees fresh features and the primary answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence

import redis.asyncio as aioredis

from core.tasks import cancel_and_wait
from feature_cache.schema import FEATURE_NAMES
from feature_cache.store import FeatureRecord, FeatureWriter

log = logging.getLogger(__name__)
INTERVAL_S = 0.2  # well within the features' age bound
# Where a feature's walk is mapped from [-1, 1]-ish noise to its usual range: base + scale * |x|.
POSITIVE = {
    "spread_bps": (1.0, 5.0),
    "realized_vol_5s_bps": (3.0, 20.0),
    "realized_vol_30s_bps": (5.0, 20.0),
    "trade_intensity_5s": (0.0, 10.0),
}


async def keep_writing(writer: FeatureWriter, symbols: Sequence[str], seed: int = 7) -> None:
    """Mean-reverting noise per feature and symbol, written every ``INTERVAL_S``."""
    rng = random.Random(seed)
    state = {s: dict.fromkeys(FEATURE_NAMES, 0.0) for s in symbols}
    offset = 0
    while True:
        records = []
        for symbol, walk in state.items():
            for name in FEATURE_NAMES:
                walk[name] = 0.9 * walk[name] + rng.gauss(0.0, 0.1)
            values = [
                POSITIVE[name][0] + POSITIVE[name][1] * abs(walk[name])
                if name in POSITIVE
                else max(-1.0, min(1.0, walk[name]))
                for name in FEATURE_NAMES
            ]
            offset += 1
            records.append(FeatureRecord(symbol, tuple(values), time.time_ns() // 1000, offset))
        try:
            await writer.write_many(records)
        except Exception as exc:  # noqa: BLE001 - keep writing; the server sees staleness
            log.warning("feature write failed: %s", exc)
        await asyncio.sleep(INTERVAL_S)


@contextlib.asynccontextmanager
async def fresh_features(
    redis_url: str, key_prefix: str, symbols: Sequence[str] = ("BTC-USD",)
) -> AsyncIterator[None]:
    """``symbols``' features rewritten in Redis while the block runs, as the consumer
    would."""
    client = aioredis.Redis.from_url(redis_url)
    writer = FeatureWriter(client, key_prefix=key_prefix, ttl_s=30)
    task = asyncio.create_task(keep_writing(writer, symbols))
    try:
        await asyncio.sleep(0.1)
        yield
    finally:
        await cancel_and_wait(task)
        await client.aclose()
