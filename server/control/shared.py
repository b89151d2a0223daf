"""``SharedControl``: on-call's levers, their two copies, and this server's view of them.

The audit store's database holds the truth (``ControlStore``): a change is written there,
with its audit row, before AdminService answers. Redis holds a copy for distribution: one
hash (the version and the entries), replaced whole by a script that never lowers its
version, which also publishes on the change channel. Every server re-reads Redis when a
message comes, checks its version every ``resync_interval_ms`` (a lost message, a
flushed store) and reads the durable copy every ``DURABLE_POLL_S`` (a change Redis did
not take, Redis unreachable).

The rule: this server's state only moves to a higher version, so a lever changes only
by an audited action or its own expiry (wall-clock times in the entries). A Redis copy
that vanished, went back, or changed without a new version lost data (a restart without
persistence, a failover, a flush, an eviction): it is never obeyed; the loss is counted
and logged, and the state is written back from the durable copy (the script lets one
writer win). A Redis copy that is merely behind is brought up to date the same way,
without counting a loss.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.pubsub import listen
from core.tasks import cancel_and_wait
from server.audit.record import AdminRecord
from server.control.durable import ControlStore, StoredState, Written
from server.control.state import ControlState, Entry, FlagSpec, decode_entries, encode_entries
from server.errors import SharedStateUnavailable

log = logging.getLogger(__name__)

# How often each server reads the durable copy: the bound on how late a change is seen
# when Redis did not take it (or cannot be reached).
DURABLE_POLL_S = 1.0
# The longest a read of the durable copy may take before it counts as failed.
DURABLE_READ_TIMEOUT_S = 5.0
# The longest a change may wait for the durable store: past it, on-call is told the
# change may or may not have been written (the transaction may still commit).
CHANGE_TIMEOUT_S = 10.0

# KEYS: the state hash, the change channel. ARGV: version, entries. Never lowers the
# version (the same version is written again: entries lost without a new version come
# back); returns 1 when it wrote.
_WRITE_UNLESS_OLDER = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'entries', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[1])
return 1
"""

_REDIS_ERRORS = (aioredis.RedisError, OSError)


@dataclass(frozen=True, slots=True)
class Loss:
    """The last time Redis's copy was found to have lost data."""

    at_us: int
    what: str


@dataclass(frozen=True, slots=True)
class SyncStatus:
    in_sync: bool  # Redis answered the last read
    synced_at_us: int  # wall clock of the last successful Redis read, 0 if none
    error: str  # why the last Redis read failed, when not in sync
    version: int
    durable_ok: bool  # the durable copy answered the last read
    durable_error: str
    losses: int  # times this server found Redis's copy lost data
    last_loss: Loss | None


@dataclass(frozen=True, slots=True)
class _RedisCopy:
    version: int
    entries: Mapping[str, Entry]


class SharedControl:
    def __init__(
        self,
        url: str,
        *,
        store: ControlStore,
        key_prefix: str,
        flags: Mapping[str, FlagSpec],
        resync_interval_ms: float,
        redis_timeout_ms: float,
    ) -> None:
        timeout_s = redis_timeout_ms / 1000.0
        self._redis = aioredis.Redis.from_url(
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
        self._write_unless_older = self._redis.register_script(_WRITE_UNLESS_OLDER)
        self._store = store
        self._key = f"{key_prefix}control:state"
        self._channel = f"{key_prefix}control:changed"
        self._flags = dict(flags)
        self._resync_interval_s = resync_interval_ms / 1000.0
        self.state = ControlState.from_entries(0, {}, self._flags)
        self._redis_seen = 0  # the highest version read from Redis
        self._in_sync = False
        self._synced_at_us = 0
        self._error = "not read yet"
        self._durable_read_at_us = 0
        self._durable_error = "not read yet"
        self._durable_ok: bool | None = None  # None: not tried yet
        self.losses = 0
        self._last_loss: Loss | None = None
        self._sync_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopped = False

    @property
    def flags(self) -> Mapping[str, FlagSpec]:
        return self._flags

    @property
    def known(self) -> bool:
        """Whether the durable copy has been read: before, this server may not know of a
        lever engaged while Redis was empty or away."""
        return self._durable_read_at_us > 0

    async def start(self) -> None:
        """Reads both copies once (a failure leaves what it has, and says so in status),
        then follows them in the background."""
        if self._started:
            return
        self._started = True
        await self.read_durable()
        await self.sync()
        self._tasks = [
            asyncio.create_task(self._listen(), name="control-listen"),
            asyncio.create_task(self._resync(), name="control-resync"),
            asyncio.create_task(self._poll_durable(), name="control-durable"),
        ]

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(*self._tasks)
        await self._subscriber.aclose()
        await self._redis.aclose()
        await asyncio.to_thread(self._store.dispose)

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
            losses=self.losses,
            last_loss=self._last_loss,
        )

    def snapshot(self, entries: Mapping[str, Entry]) -> ControlState:
        """A state holding only ``entries`` (what a change replaced, for its audit row)."""
        return ControlState.from_entries(0, entries, self._flags)

    def _adopt(self, version: int, entries: Mapping[str, Entry], source: str) -> None:
        """Takes a copy's state when it is newer than this server's."""
        if version > self.state.version:
            log.info("control state version %d from %s: %d entries", version, source, len(entries))
            self.state = ControlState.from_entries(version, entries, self._flags)

    async def read_durable(self) -> bool:
        """Reads the durable copy; False (state kept, status says why) when it failed."""
        try:
            async with asyncio.timeout(DURABLE_READ_TIMEOUT_S):
                stored: StoredState = await asyncio.to_thread(self._store.load)
        except (sa.exc.SQLAlchemyError, OSError, ValueError, TimeoutError) as exc:
            if self._durable_ok is not False:
                log.warning("control state: durable copy not read: %r", exc)
            self._durable_ok = False
            self._durable_error = f"{type(exc).__name__}: {exc}"
            return False
        self._adopt(stored.version, stored.entries, "the durable copy")
        self._durable_ok = True
        self._durable_error = ""
        self._durable_read_at_us = time.time_ns() // 1000
        return True

    async def sync(self) -> bool:
        """Reads Redis's copy: takes it when newer, writes it back when behind or lost.
        False (state kept) when Redis did not answer."""
        async with self._sync_lock:
            try:
                raw_version, raw_entries = await self._redis.hmget(self._key, "version", "entries")
            except _REDIS_ERRORS as exc:
                self._out_of_sync(exc)
                return False
            if not self._in_sync:
                log.info("control state in sync with Redis at version %d", self.state.version)
            self._in_sync = True
            self._synced_at_us = time.time_ns() // 1000
            self._error = ""
            copy, loss = self._judge(raw_version, raw_entries)
            if copy is not None and not loss:
                self._redis_seen = max(self._redis_seen, copy.version)
                self._adopt(copy.version, copy.entries, "Redis")
            if loss or (copy is not None and copy.version < self.state.version):
                await self._repair(loss)
            return True

    def _judge(
        self, raw_version: bytes | str | None, raw_entries: bytes | str | None
    ) -> tuple[_RedisCopy | None, str]:
        """Redis's copy, and why it must have lost data (empty when it may be right or
        merely behind)."""
        mine = self.state
        if raw_version is None:
            if mine.version == 0:
                return None, ""
            return None, f"Redis held no control state; this server has version {mine.version}"
        try:
            copy = _RedisCopy(int(raw_version), decode_entries(raw_entries or b""))
        except ValueError as exc:  # not written by this code
            return None, f"Redis's control state is unreadable: {exc}"
        if copy.version < self._redis_seen:
            loss = (
                f"Redis's control state went back from version {self._redis_seen} to {copy.version}"
            )
        elif copy.version == mine.version and copy.entries != mine.entries:
            loss = f"Redis's control state at version {copy.version} changed without a new version"
        else:
            loss = ""
        return copy, loss

    async def _repair(self, loss: str) -> None:
        """Writes the highest state known (the durable copy's, or this server's if
        higher) back to Redis; counts ``loss`` when there was one."""
        if loss:
            self.losses += 1
            self._last_loss = Loss(time.time_ns() // 1000, loss)
            log.error(
                "control state lost in Redis: %s; keeping version %d and writing it back",
                loss,
                self.state.version,
            )
        await self.read_durable()
        state = self.state
        try:
            wrote = await self._write_redis(state.version, state.entries)
        except _REDIS_ERRORS as exc:
            self._out_of_sync(exc)
            return
        if wrote:
            log.warning("control state version %d written to Redis", state.version)
        self._redis_seen = max(self._redis_seen, state.version)  # Redis holds at least it

    async def _write_redis(self, version: int, entries: Mapping[str, Entry]) -> bool:
        args: list[int | bytes] = [version, encode_entries(entries)]
        return bool(await self._write_unless_older(keys=[self._key, self._channel], args=args))

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
        try:
            async with asyncio.timeout(CHANGE_TIMEOUT_S):
                written = await asyncio.to_thread(
                    self._store.write,
                    field_name,
                    entry,
                    known=StoredState(self.state.version, self.state.entries),
                    record_for=record_for,
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
        if written is None:
            return None
        async with self._sync_lock:
            self._adopt(written.state.version, written.state.entries, "this server's change")
            try:
                await self._write_redis(written.state.version, written.state.entries)
            except _REDIS_ERRORS as exc:
                self._out_of_sync(exc)
                log.warning(
                    "control state version %d recorded durably, not in Redis (%r): the "
                    "other servers read it from the durable copy",
                    written.state.version,
                    exc,
                )
            else:
                self._redis_seen = max(self._redis_seen, written.state.version)
        return written

    async def _listen(self) -> None:
        # A message only says that something changed: the whole state is read again, as
        # it is once subscribed (what changed while not subscribed).
        await listen(
            self._subscriber,
            self._channel,
            on_subscribed=self._read_again,
            on_message=self._read_again,
            on_lost=self._out_of_sync,
        )

    async def _read_again(self, *_message: bytes) -> None:
        await self.sync()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self._resync_interval_s)
            try:
                raw_version = await self._redis.hget(self._key, "version")
                if int(raw_version or 0) != self.state.version or not self._in_sync:
                    await self.sync()
            except _REDIS_ERRORS as exc:
                self._out_of_sync(exc)
            except Exception as exc:  # the resync must outlive any surprise
                log.exception("control resync failed")
                self._out_of_sync(exc)

    async def _poll_durable(self) -> None:
        while True:
            await asyncio.sleep(DURABLE_POLL_S)
            try:
                if await self.read_durable() and self.state.version > self._redis_seen:
                    await self.sync()  # Redis missed a change: bring it up to date
            except Exception:  # the poll must outlive any surprise
                log.exception("control durable poll failed")
