"""``FeatureMirror``: every symbol's latest feature record in this process's memory.

A Redis read costs a round trip: the mirror subscribes to the records the writer publishes
(``feature_cache.store``), loads every record once, then keeps the newer (event time, then
source offset) of what it holds and what is published. Pub/sub delivers at most once, so
it answers only while live, from a load on a working subscription until that fails (then
it resubscribes and loads again), and, once it holds ``max_symbols``, only for those:
otherwise ``lookup`` returns None and the caller reads Redis.
Behaviour: docs/market-data.md#market-data-and-features
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import redis.asyncio as aioredis

from core.pubsub import listen
from core.tasks import cancel_and_wait
from feature_cache.store import (
    FeatureReader,
    FeatureRecord,
    decode_change,
    feature_channel,
)

log = logging.getLogger(__name__)

LOAD_SYMBOLS = 100_000  # SCAN bound for a load; max_symbols bounds what is kept
MAX_SYMBOLS = 10_000  # records kept at most: a bound on memory far past any symbol list


@dataclass(frozen=True, slots=True)
class MirrorStatus:
    live: bool
    symbols: int
    full: bool  # max_symbols reached: symbols it does not hold are read from Redis
    since_us: int  # wall clock of the last change of ``live``
    error: str  # why it is not live
    losses: int  # subscriptions lost since start
    applied: int  # published records applied since start


class FeatureMirror:
    def __init__(
        self,
        url: str,
        *,
        key_prefix: str,
        connect_timeout_ms: float,
        max_symbols: int = MAX_SYMBOLS,
    ) -> None:
        timeout_s = connect_timeout_ms / 1000.0
        # Pub/sub waits for messages indefinitely: no read timeout; an idle connection's
        # health is checked by a ping.
        self._subscriber = aioredis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, health_check_interval=5
        )
        self._loader = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._reader = FeatureReader(self._loader, key_prefix=key_prefix)
        self._channel = feature_channel(key_prefix)
        self._max_symbols = max_symbols
        self._records: dict[str, FeatureRecord] = {}
        self._full = False
        self._live = False
        self._since_us = time.time_ns() // 1000
        self._error = "not loaded yet"
        self._losses = 0
        self._applied = 0
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        """Starts the listener; returns at once (the mirror is live after its first load)."""
        if self._task is None and not self._stopped:
            self._task = asyncio.create_task(self._listen(), name="feature-mirror")

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._set_live(False, "stopped")
        await cancel_and_wait(self._task)
        await self._subscriber.aclose()
        await self._loader.aclose()

    async def __aenter__(self) -> FeatureMirror:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def live(self) -> bool:
        return self._live

    def lookup(self, symbols: Sequence[str]) -> list[FeatureRecord | None] | None:
        """Each symbol's record (None: it has none), or None when the mirror cannot say
        for all of them: not live, or full and missing one. A record keeps its event time,
        so the decision path's freshness rules hold."""
        if not self._live:
            return None
        records = [self._records.get(symbol) for symbol in symbols]
        if self._full and None in records:
            return None
        return records

    def status(self) -> MirrorStatus:
        return MirrorStatus(
            self._live,
            len(self._records),
            self._full,
            self._since_us,
            self._error,
            self._losses,
            self._applied,
        )

    def _set_live(self, live: bool, error: str = "") -> None:
        if live != self._live:
            self._since_us = time.time_ns() // 1000
            if live:
                log.info("feature mirror live: %d symbols", len(self._records))
            elif not self._stopped:
                self._losses += 1
                log.warning("feature mirror not live, reading Redis: %s", error)
        self._live, self._error = live, error

    async def _listen(self) -> None:
        await listen(
            self._subscriber,
            self._channel,
            on_subscribed=self._load,
            on_message=self._apply,
            on_lost=self._lost,
        )

    def _lost(self, exc: BaseException) -> None:
        self._set_live(False, f"{type(exc).__name__}: {exc}")

    async def _load(self) -> None:
        """Every record, read once the subscription is up: a record written meanwhile is
        in the load or in a message, and the newer one wins either way."""
        symbols = await self._reader.symbols(limit=LOAD_SYMBOLS)
        records = await self._reader.read_many(symbols) if symbols else []
        self._records = {}
        self._full = False
        for record in records:
            self._keep(record)
        self._set_live(True)

    async def _apply(self, data: bytes) -> None:
        if self._keep(decode_change(data)):
            self._applied += 1

    def _keep(self, record: FeatureRecord | None) -> bool:
        if record is None:
            return False
        held = self._records.get(record.symbol)
        if held is None and len(self._records) >= self._max_symbols:
            self._full = True
            return False
        if held is not None and (held.event_time_us, held.source_offset) >= (
            record.event_time_us,
            record.source_offset,
        ):
            return False
        self._records[record.symbol] = record
        return True
