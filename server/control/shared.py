"""``SharedControl``: on-call's levers as this server applies them, and their two copies.

The audit store's database holds the truth (``ControlStore``): a change is written there,
with its audit row, before AdminService answers, and a server applies only what it read
there. Redis holds a copy that tells every server of a change (``RedisCopy``: a message,
and a version each server checks every ``RESYNC_INTERVAL_MS``); each server also reads
the durable copy every ``DURABLE_POLL_S``, for a change Redis did not take.

Until it has read the durable copy, a server stops every symbol (a kill switch for
``*``): it cannot know what on-call engaged. Then its state changes only to a durable
state at least as new, so a lever changes only by an audited action or its own expiry
(wall-clock times in the entries).

A Redis copy that vanished, went back, holds a version the durable copy does not, or
changed without a new version lost data (a restart without persistence, a failover, a
flush, an eviction, a write by hand). It was never obeyed: the loss is counted and
logged, and the copy written again; one merely behind is brought up to date without
counting. A durable copy older than what this server applied (restored from a backup)
is counted too, and written back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import sqlalchemy as sa

from core.pubsub import listen
from core.tasks import cancel_and_wait
from server.audit.record import AdminRecord
from server.control.durable import ControlStore, StoredState, Written
from server.control.redis_copy import REDIS_ERRORS, Copy, RedisCopy, judge
from server.control.state import GLOBAL_SCOPE, KILL_PREFIX, Change, ControlState, Entry, FlagSpec
from server.errors import SharedStateUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often each server reads the durable copy: the bound on how late a change is seen
# when Redis did not take it (or cannot be reached).
DURABLE_POLL_S = 1.0
# The longest one read or write of Redis's copy may take: Redis down is told in a second.
CONTROL_REDIS_TIMEOUT_MS = 1000.0
# How often each server checks the version of Redis's copy, besides pub/sub: the bound
# on how late a change is seen when a message is lost.
RESYNC_INTERVAL_MS = 250.0
# The longest a read of the durable copy may take before it counts as failed.
DURABLE_READ_TIMEOUT_S = 5.0
# The longest a change may wait for the durable store: past it, on-call is told the
# change may or may not have been written (the transaction may still commit).
CHANGE_TIMEOUT_S = 10.0
NOT_READ = "the control state has not been read from the audit store yet"
REDIS, DURABLE = "redis", "durable"


@dataclass(frozen=True, slots=True)
class Loss:
    """The last time a copy was found to have lost data."""

    at_us: int
    what: str


@dataclass(frozen=True, slots=True)
class SyncStatus:
    in_sync: bool  # Redis answered the last read
    synced_at_us: int  # wall clock of the last successful Redis read, 0 if none
    error: str  # why the last Redis read failed, when not in sync
    version: int  # -1 until the durable copy has been read
    durable_ok: bool  # the durable copy answered the last read
    durable_error: str
    losses: Mapping[str, int]  # by copy: times this server found it had lost data
    last_loss: Loss | None


def not_read_state(flags: Mapping[str, FlagSpec]) -> ControlState:
    """Every symbol stopped, at a version below any stored one."""
    stop = Entry(True, Change("decision-server", NOT_READ, time.time_ns() // 1000))
    return ControlState.from_entries(-1, {KILL_PREFIX + GLOBAL_SCOPE: stop}, flags)


class SharedControl:
    def __init__(
        self,
        url: str,
        *,
        store: ControlStore,
        key_prefix: str,
        flags: Mapping[str, FlagSpec],
        resync_interval_ms: float = RESYNC_INTERVAL_MS,
        redis_timeout_ms: float = CONTROL_REDIS_TIMEOUT_MS,
    ) -> None:
        self._copy = RedisCopy(url, key_prefix=key_prefix, timeout_ms=redis_timeout_ms)
        self._store = store
        self._flags = dict(flags)
        self._resync_interval_s = resync_interval_ms / 1000.0
        self.state = not_read_state(self._flags)
        self._redis_seen = 0  # the highest version read from Redis in step with the store
        self._looked = False  # whether Redis's copy has been judged once
        # When this server last wrote its state back over a loss, and at which version.
        self._loss_repaired: tuple[float, int] = (-float("inf"), -1)
        self._in_sync = False
        self._synced_at_us = 0
        self._error = "not read yet"
        self._durable_ok: bool | None = None  # None: not tried yet
        self._durable_error = "not read yet"
        self.losses = {REDIS: 0, DURABLE: 0}
        self._last_loss: Loss | None = None
        self._lock = asyncio.Lock()
        # One thread for the store's blocking calls: a store that hangs holds one thread,
        # not one per poll, and stop() can wait for it.
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="control-store")
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopped = False

    @property
    def flags(self) -> Mapping[str, FlagSpec]:
        return self._flags

    @property
    def known(self) -> bool:
        """Whether the durable copy has been read: before, every symbol is stopped."""
        return self.state.version >= 0

    async def start(self) -> None:
        """Reads both copies once (a failure leaves every symbol stopped, and says so in
        status), then follows them in the background."""
        if self._started:
            return
        self._started = True
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._listen(), name="control-listen"),
            asyncio.create_task(self._resync(), name="control-resync"),
            asyncio.create_task(self._poll(), name="control-durable"),
        ]

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(*self._tasks)
        await self._copy.aclose()
        # A call the tasks left running finishes before its connections are closed.
        await asyncio.to_thread(self._store_thread.shutdown, wait=True)
        self._store.dispose()

    async def __aenter__(self) -> SharedControl:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def status(self) -> SyncStatus:
        return SyncStatus(
            in_sync=self._in_sync,
            synced_at_us=self._synced_at_us,
            error=self._error,
            version=self.state.version,
            durable_ok=bool(self._durable_ok),
            durable_error=self._durable_error,
            losses=dict(self.losses),
            last_loss=self._last_loss,
        )

    def snapshot(self, entries: Mapping[str, Entry]) -> ControlState:
        """A state holding only ``entries`` (what a change replaced, for its audit row)."""
        return ControlState.from_entries(0, entries, self._flags)

    async def _in_store_thread(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._store_thread, functools.partial(call, *args, **kwargs)
        )

    async def refresh(self) -> None:
        """Reads Redis's copy, then the durable one (in that order: a change reaches
        Redis only after the store, so a Redis version above the store's is not one);
        applies the durable state and repairs whichever copy lost data or is behind."""
        async with self._lock:
            copy = await self._read_redis()
            stored = await self._read_durable()
            if stored is not None:
                await self._apply(stored)
            if copy is not None and self.known:
                await self._check_redis(copy, judged_against_store=stored is not None)

    async def _read_redis(self) -> Copy | None:
        try:
            copy = await self._copy.read()
        except REDIS_ERRORS as exc:
            self._out_of_sync(exc)
            return None
        if not self._in_sync:
            log.info("control state: Redis answers again")
        self._in_sync = True
        self._synced_at_us = time.time_ns() // 1000
        self._error = ""
        return copy

    async def _read_durable(self) -> StoredState | None:
        try:
            async with asyncio.timeout(DURABLE_READ_TIMEOUT_S):
                stored: StoredState = await self._in_store_thread(self._store.load)
        except (sa.exc.SQLAlchemyError, OSError, ValueError, TimeoutError) as exc:
            if self._durable_ok is not False:
                log.warning("control state: durable copy not read: %r", exc)
            self._durable_ok = False
            self._durable_error = f"{type(exc).__name__}: {exc}"
            return None
        self._durable_ok = True
        self._durable_error = ""
        return stored

    async def _apply(self, stored: StoredState) -> None:
        mine = self.state
        if stored.version > mine.version:
            log.info("control state version %d: %d entries", stored.version, len(stored.entries))
            self.state = ControlState.from_entries(stored.version, stored.entries, self._flags)
        elif stored.version < mine.version:
            self._lost(
                DURABLE,
                f"the audit store's control state went back from version {mine.version}"
                f" to {stored.version}",
            )
            kept = StoredState(mine.version, mine.entries)
            try:
                async with asyncio.timeout(DURABLE_READ_TIMEOUT_S):
                    await self._in_store_thread(
                        self._store.restore, kept, over_version=stored.version
                    )
            except (sa.exc.SQLAlchemyError, OSError, TimeoutError) as exc:
                log.error("control state not written back to the audit store: %r", exc)

    async def _check_redis(self, copy: Copy, *, judged_against_store: bool) -> None:
        mine = self.state
        verdict = judge(
            copy,
            StoredState(mine.version, mine.entries),
            redis_seen=self._redis_seen,
            first_look=not self._looked,
            against_store=judged_against_store,
        )
        self._looked = True
        if verdict.in_step:
            self._redis_seen = max(self._redis_seen, mine.version)
        if not verdict.repair:
            return
        if verdict.loss:
            # One version is written back over a loss at most once per resync interval
            # (the resync tries again; a new version goes at once): two fleets on one
            # Redis key prefix with different audit stores each find the other's version
            # a loss, and would write theirs back, message each other and read it again
            # as fast as their loops run.
            now = time.monotonic()
            at, version = self._loss_repaired
            if version == mine.version and now - at < self._resync_interval_s:
                return
            self._loss_repaired = (now, mine.version)
            self._lost(REDIS, verdict.loss)
        try:
            if await self._copy.replace(copy.raw_version, mine.version, mine.entries):
                self._redis_seen = mine.version
                log.warning("control state version %d written to Redis", mine.version)
        except REDIS_ERRORS as exc:
            self._out_of_sync(exc)

    def _lost(self, copy: str, what: str) -> None:
        self.losses[copy] += 1
        self._last_loss = Loss(time.time_ns() // 1000, what)
        log.error(
            "control state lost: %s; keeping version %d and writing it back",
            what,
            self.state.version,
        )

    def _out_of_sync(self, exc: BaseException) -> None:
        if self._in_sync:
            log.warning(
                "control state out of sync with Redis, keeping version %d: %r",
                self.state.version,
                exc,
            )
        self._in_sync = False
        self._error = f"{type(exc).__name__}: {exc}"

    async def change(
        self,
        field_name: str,
        entry: Entry | None,
        record_for: Callable[[Entry | None], AdminRecord | None],
    ) -> Written | None:
        """Sets (None: clears) one field on every server, with the audit row
        ``record_for`` makes of the entry it replaces (read in the durable store's
        transaction); None, nothing written, when ``record_for`` returns None. Raises
        ``SharedStateUnavailable`` when the durable store did not take it; a Redis that
        does not take it is only logged (the servers read the durable copy within
        ``DURABLE_POLL_S``)."""
        known = StoredState(self.state.version, self.state.entries)
        try:
            async with asyncio.timeout(CHANGE_TIMEOUT_S):
                written = await self._in_store_thread(
                    self._store.write, field_name, entry, known=known, record_for=record_for
                )
        except TimeoutError as exc:
            raise SharedStateUnavailable(
                f"the audit store did not answer within {CHANGE_TIMEOUT_S:.0f} s; the change "
                "may still be applied: check decisionctl status and history"
            ) from exc
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise SharedStateUnavailable(
                f"the audit store did not take the change: {type(exc).__name__}: {exc}"
            ) from exc
        if written is not None:
            async with self._lock:
                # This server applies it at once, unless it already read a later change.
                if written.state.version > self.state.version:
                    await self._apply(written.state)
            await self.refresh()  # and tells the others through Redis
        return written

    async def _listen(self) -> None:
        # A message only says that something changed: both copies are read again, as
        # they are once subscribed (what changed while not subscribed).
        await listen(
            self._copy.subscriber,
            self._copy.channel,
            on_subscribed=self.refresh,
            on_message=self._on_message,
            on_lost=self._out_of_sync,
        )

    async def _on_message(self, _message: bytes) -> None:
        await self.refresh()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self._resync_interval_s)
            try:
                raw_version = await self._copy.raw_version()
                in_step = raw_version == str(self.state.version) or (
                    raw_version == "" and self.state.version == 0
                )
                if not in_step or not self._in_sync:
                    await self.refresh()
            except REDIS_ERRORS as exc:
                self._out_of_sync(exc)
            except Exception as exc:  # the resync must outlive any surprise
                log.exception("control resync failed")
                self._out_of_sync(exc)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(DURABLE_POLL_S)
            try:
                await self.refresh()
            except Exception:  # the poll must outlive any surprise
                log.exception("control durable poll failed")
