"""``SharedControl``: on-call's levers as this server applies them.

The audit store's database holds the one copy (``ControlStore``): a change is written
there, with its audit row, before AdminService answers, and a server applies only what it
read there. Redis pub/sub announces a change, and each server also reads the store every
``DURABLE_POLL_S``, so Redis lost or down delays a change by a poll at most. Until it has
read the store, a server stops every symbol; after, a lever changes only by an audited
action or its own expiry. The whole contract:
docs/architecture.md#contracts-several-parts-share.
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

import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.pubsub import listen
from core.tasks import cancel_and_wait
from server.audit.record import AdminRecord
from server.control.durable import ControlStore, StoredState, Written
from server.control.state import GLOBAL_SCOPE, KILL_PREFIX, Change, ControlState, Entry, FlagSpec
from server.errors import SharedStateUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_ERRORS = (aioredis.RedisError, OSError)
# How often each server reads the store besides announcements: the bound on how late a
# change is seen when its announcement is lost (or Redis is down).
DURABLE_POLL_S = 1.0
# The longest an announcement may take: a change is in the store already, so a Redis that
# does not answer only delays the other servers by one poll.
ANNOUNCE_TIMEOUT_S = 1.0
# The longest a read of the store may take before it counts as failed.
DURABLE_READ_TIMEOUT_S = 5.0
# The longest a change may wait for the store: past it, on-call is told the change may
# or may not have been written (the transaction may still commit).
CHANGE_TIMEOUT_S = 10.0
NOT_READ = "the control state has not been read from the audit store yet"


@dataclass(frozen=True, slots=True)
class Loss:
    """The last time the store's copy was found to have gone back."""

    at_us: int
    what: str


@dataclass(frozen=True, slots=True)
class SyncStatus:
    listening: bool  # subscribed to announcements: a change applies at once
    listen_error: str  # why not, when not listening
    version: int  # -1 until the store has been read
    durable_ok: bool  # the store answered the last read
    durable_error: str
    read_at_us: int  # wall clock of the last successful read of the store, 0 if none
    losses: int  # times the store's copy went back and was written back
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
    ) -> None:
        timeout_s = ANNOUNCE_TIMEOUT_S
        self._publisher = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        # Pub/sub waits for messages indefinitely, so it gets a client without a read
        # timeout; its health is checked by pinging an idle connection.
        self._subscriber = aioredis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, health_check_interval=5
        )
        self.channel = f"{key_prefix}control:changed"
        self._store = store
        self._flags = dict(flags)
        self.state = not_read_state(self._flags)
        self._subscribed = False  # the listener's subscription is up
        self._redis_answers = True  # the last ping of Redis was answered
        self._listen_error = "not subscribed yet"
        self._durable_ok: bool | None = None  # None: not tried yet
        self._durable_error = "not read yet"
        self._read_at_us = 0
        self.losses = 0
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
        """Whether the store has been read: before, every symbol is stopped."""
        return self.state.version >= 0

    async def start(self) -> None:
        """Reads the store once (a failure leaves every symbol stopped, and says so in
        status), then follows announcements and polls it in the background."""
        if self._started:
            return
        self._started = True
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._listen(), name="control-listen"),
            asyncio.create_task(self._poll(), name="control-durable"),
            asyncio.create_task(self._watch_redis(), name="control-redis-watch"),
        ]

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(*self._tasks)
        await self._subscriber.aclose()
        await self._publisher.aclose()
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
            listening=self._subscribed and self._redis_answers,
            listen_error="" if self._subscribed and self._redis_answers else self._listen_error,
            version=self.state.version,
            durable_ok=bool(self._durable_ok),
            durable_error=self._durable_error,
            read_at_us=self._read_at_us,
            losses=self.losses,
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
        """Reads the store and applies what it holds (writes it back when it went back)."""
        async with self._lock:
            stored = await self._read_durable()
            if stored is not None:
                await self._apply(stored)

    async def _read_durable(self) -> StoredState | None:
        try:
            async with asyncio.timeout(DURABLE_READ_TIMEOUT_S):
                stored: StoredState = await self._in_store_thread(self._store.load)
        except (sa.exc.SQLAlchemyError, OSError, ValueError, TimeoutError) as exc:
            if self._durable_ok is not False:
                log.warning("control state: the audit store not read: %r", exc)
            self._durable_ok = False
            self._durable_error = f"{type(exc).__name__}: {exc}"
            return None
        if self._durable_ok is False:
            log.info("control state: the audit store answers again")
        self._durable_ok = True
        self._durable_error = ""
        self._read_at_us = time.time_ns() // 1000
        return stored

    async def _apply(self, stored: StoredState) -> None:
        mine = self.state
        if stored.version > mine.version:
            log.info("control state version %d: %d entries", stored.version, len(stored.entries))
            self.state = ControlState.from_entries(stored.version, stored.entries, self._flags)
        elif stored.version < mine.version:  # the store restored from a backup, say
            self._lost(
                f"the audit store's control state went back from version {mine.version}"
                f" to {stored.version}"
            )
            kept = StoredState(mine.version, mine.entries)
            try:
                async with asyncio.timeout(DURABLE_READ_TIMEOUT_S):
                    await self._in_store_thread(
                        self._store.restore, kept, over_version=stored.version
                    )
            except (sa.exc.SQLAlchemyError, OSError, TimeoutError) as exc:
                log.error("control state not written back to the audit store: %r", exc)

    def _lost(self, what: str) -> None:
        self.losses += 1
        self._last_loss = Loss(time.time_ns() // 1000, what)
        log.error(
            "control state lost: %s; keeping version %d and writing it back",
            what,
            self.state.version,
        )

    async def change(
        self,
        field_name: str,
        entry: Entry | None,
        record_for: Callable[[Entry | None], AdminRecord | None],
    ) -> Written | None:
        """Sets (None: clears) one field on every server, with the audit row
        ``record_for`` makes of the entry it replaces (read in the store's transaction);
        None, nothing written, when ``record_for`` returns None. Raises
        ``SharedStateUnavailable`` when the store did not take it; an announcement that
        Redis does not take is only logged (the servers read the store within
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
            await self._announce(written.state.version)
        return written

    async def _announce(self, version: int) -> None:
        try:
            await self._publisher.publish(self.channel, str(version))
        except REDIS_ERRORS as exc:
            log.warning(
                "control state version %d not announced (the others read it within %.0f s): %r",
                version,
                DURABLE_POLL_S,
                exc,
            )

    async def _listen(self) -> None:
        # Once subscribed the store is read again: a change announced while this server
        # was not subscribed was lost to it.
        await listen(
            self._subscriber,
            self.channel,
            on_subscribed=self._on_subscribed,
            on_message=self._on_message,
            on_lost=self._on_lost,
        )

    async def _on_subscribed(self) -> None:
        log.info("control state: following announcements on %s", self.channel)
        self._subscribed = True
        self._listen_error = ""
        await self.refresh()

    async def _on_message(self, message: bytes) -> None:
        try:
            announced = int(message)
        except ValueError:
            announced = None  # not this code's: read the store anyway
        if announced is None or announced > self.state.version:
            await self.refresh()

    def _on_lost(self, exc: BaseException) -> None:
        if self._subscribed:
            log.warning(
                "control state: announcements lost (%r); reading the store every %.0f s",
                exc,
                DURABLE_POLL_S,
            )
        self._subscribed = False
        self._listen_error = f"{type(exc).__name__}: {exc}"

    async def _watch_redis(self) -> None:
        # A subscription does not notice a Redis that stopped answering (a pause, a
        # partition): it only waits for messages. A ping every poll tells status.
        while True:
            await asyncio.sleep(DURABLE_POLL_S)
            try:
                await self._publisher.ping()
                self._redis_answers = True
            except REDIS_ERRORS as exc:
                self._redis_answers = False
                self._listen_error = f"{type(exc).__name__}: {exc}"

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(DURABLE_POLL_S)
            try:
                await self.refresh()
            except Exception:  # the poll must outlive any surprise
                log.exception("control durable poll failed")
