"""Keeps feature records fresh without Kafka, for benchmarks of the decision path alone.

A seeded random walk per symbol, written through the same ``FeatureWriter`` the consumer
uses (monotonic, with a TTL), so Decide sees fresh features and the primary answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import redis.asyncio as aioredis

from core.tasks import cancel_and_wait
from feature_cache.schema import FEATURE_NAMES
from feature_cache.store import FeatureRecord, FeatureWriter

log = logging.getLogger(__name__)


class RecordWriter(Protocol):
    """Where records go: a ``FeatureWriter``, or a test's wrapper of one."""

    async def write_many(self, records: list[FeatureRecord]) -> int: ...


class FeatureKeeper:
    def __init__(
        self, writer: RecordWriter, symbols: Sequence[str], *, interval_s: float, seed: int = 7
    ) -> None:
        self._writer = writer
        self._symbols = list(symbols)
        self._interval_s = interval_s
        self._rng = random.Random(seed)
        self._state = {s: dict.fromkeys(FEATURE_NAMES, 0.0) for s in self._symbols}
        self._offset = 0
        self._task: asyncio.Task[None] | None = None

    def _step(self, symbol: str) -> FeatureRecord:
        """Mean-reverting noise per feature, mapped into each feature's usual range."""
        state = self._state[symbol]
        for name in FEATURE_NAMES:
            state[name] = 0.9 * state[name] + self._rng.gauss(0.0, 0.1)
        values = dict(state)
        values["spread_bps"] = 1.0 + 5.0 * abs(state["spread_bps"])
        values["realized_vol_5s_bps"] = 3.0 + 20.0 * abs(state["realized_vol_5s_bps"])
        values["realized_vol_30s_bps"] = 5.0 + 20.0 * abs(state["realized_vol_30s_bps"])
        values["trade_intensity_5s"] = 10.0 * abs(state["trade_intensity_5s"])
        for name in ("imbalance_l1", "imbalance_l5"):
            values[name] = max(-1.0, min(1.0, state[name]))
        self._offset += 1
        return FeatureRecord(
            symbol=symbol,
            values=tuple(values[name] for name in FEATURE_NAMES),
            event_time_us=time.time_ns() // 1000,
            source_offset=self._offset,
        )

    async def _run(self) -> None:
        while True:
            try:
                await self._writer.write_many([self._step(s) for s in self._symbols])
            except Exception as exc:  # noqa: BLE001 - keep writing; the server sees staleness
                log.warning("feature write failed: %s", exc)
            await asyncio.sleep(self._interval_s)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)


@contextlib.asynccontextmanager
async def fresh_features(
    redis_url: str, key_prefix: str, symbols: Sequence[str] = ("BTC-USD",)
) -> AsyncIterator[None]:
    """``symbols``' features rewritten in Redis every 0.2 s while the block runs, as the
    consumer would."""
    client = aioredis.Redis.from_url(redis_url)
    keeper = FeatureKeeper(
        FeatureWriter(client, key_prefix=key_prefix, ttl_s=30), symbols, interval_s=0.2
    )
    await keeper.start()
    try:
        await asyncio.sleep(0.1)
        yield
    finally:
        await keeper.stop()
        await client.aclose()
