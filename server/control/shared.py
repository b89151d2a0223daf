"""``SharedControl``: the control state in Redis, and this server's copy of it.

A change is one Redis transaction: the entry is written, the version raised and a
message published on the change channel. Every server hears the message (pub/sub) and
reads the whole state again; a resync every ``resync_interval_ms`` compares versions and
catches what a dropped subscription missed. So a server learns of a change within
milliseconds, and within ``resync_interval_ms`` at worst while Redis is reachable.

Redis unreachable: the server keeps its last known state (expiries still apply, they
are wall-clock times) and ``status()`` says since when it is out of sync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import WatchError

from core.pubsub import listen
from core.tasks import cancel_and_wait
from server.control.state import ControlState, Entry, FlagSpec
from server.errors import SharedStateUnavailable

log = logging.getLogger(__name__)

PUT_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Put:
    applied: bool
    before: ControlState  # the written field as it was (alone), applied or not


@dataclass(frozen=True, slots=True)
class SyncStatus:
    in_sync: bool
    synced_at_us: int  # wall clock of the last successful read, 0 if none
    error: str  # why the last read failed, when not in sync
    version: int


class SharedControl:
    def __init__(
        self,
        url: str,
        *,
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
        self._hash = f"{key_prefix}control"
        self._version_key = f"{key_prefix}control:version"
        self._channel = f"{key_prefix}control:changed"
        self._flags = dict(flags)
        self._resync_interval_s = resync_interval_ms / 1000.0
        self.state = ControlState.from_entries(0, {}, self._flags)
        self._in_sync = False
        self._synced_at_us = 0
        self._error = "not read yet"
        self._sync_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopped = False

    @property
    def flags(self) -> Mapping[str, FlagSpec]:
        return self._flags

    async def start(self) -> None:
        """Reads the state once (a failure leaves the defaults, and says so in status),
        then listens for changes and resyncs in the background."""
        if self._started:
            return
        self._started = True
        await self.sync()
        self._tasks = [
            asyncio.create_task(self._listen(), name="control-listen"),
            asyncio.create_task(self._resync(), name="control-resync"),
        ]

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(*self._tasks)
        await self._subscriber.aclose()
        await self._redis.aclose()

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
        return SyncStatus(self._in_sync, self._synced_at_us, self._error, self.state.version)

    async def sync(self) -> bool:
        """Reads the whole state; False (state kept) when Redis did not answer."""
        async with self._sync_lock:
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.get(self._version_key)
                    pipe.hgetall(self._hash)
                    raw_version, raw_entries = await pipe.execute()
            except (aioredis.RedisError, OSError) as exc:
                self._lost(exc)
                return False
            entries = {}
            for raw_field, raw in raw_entries.items():
                name = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
                try:
                    entries[name] = Entry.decode(raw)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("control entry %s ignored: %r", name, exc)
            version = int(raw_version or 0)
            if version != self.state.version or not self._in_sync:
                log.info("control state version %d: %d entries", version, len(entries))
            self.state = ControlState.from_entries(version, entries, self._flags)
            self._in_sync = True
            self._synced_at_us = time.time_ns() // 1000
            self._error = ""
            return True

    def _lost(self, exc: BaseException) -> None:
        if self._in_sync:
            log.warning(
                "control state out of sync, keeping version %d: %r", self.state.version, exc
            )
        self._in_sync = False
        self._error = f"{type(exc).__name__}: {exc}"

    def snapshot(self, entries: Mapping[str, Entry]) -> ControlState:
        """A state holding only ``entries`` (what a change replaced, for its audit row)."""
        return ControlState.from_entries(0, entries, self._flags)

    async def put(
        self,
        field_name: str,
        entry: Entry | None,
        *,
        only_if: Callable[[ControlState], bool] | None = None,
    ) -> Put:
        """Writes (or with None deletes) one entry on every server, unless ``only_if``
        rejects the field's current value (read in the same transaction, so two servers
        cannot both act on one value). Raises ``SharedStateUnavailable`` when Redis did
        not take it."""
        first_before: ControlState | None = None
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(PUT_ATTEMPTS):
                    try:
                        await pipe.watch(self._hash)
                        raw_before = await pipe.hget(self._hash, field_name)
                        before = self.snapshot(self._decoded(field_name, raw_before))
                        if first_before is None:
                            first_before = before
                        elif entry is not None and raw_before == entry.encode():
                            # redis-py reports a connection lost during EXEC as a
                            # WatchError: this write did land (the entry is unique by its
                            # change time), so it is not written again.
                            before = first_before
                            break
                        if only_if is not None and not only_if(before):
                            return Put(False, before)  # leaving the block unwatches
                        pipe.multi()  # type: ignore[no-untyped-call]  # untyped in redis-py
                        if entry is None:
                            pipe.hdel(self._hash, field_name)
                        else:
                            pipe.hset(self._hash, field_name, entry.encode())
                        pipe.incr(self._version_key)
                        pipe.publish(self._channel, field_name)
                        await pipe.execute()
                        break
                    except WatchError:  # another change to the hash came first: read again
                        continue
                else:
                    raise SharedStateUnavailable(
                        f"control state changed {PUT_ATTEMPTS} times while writing; try again"
                    )
        except (aioredis.RedisError, OSError) as exc:
            self._lost(exc)
            raise SharedStateUnavailable(f"{type(exc).__name__}: {exc}") from exc
        await self.sync()  # this server applies its own change at once
        return Put(True, before)

    @staticmethod
    def _decoded(field_name: str, raw: bytes | str | None) -> dict[str, Entry]:
        if raw is None:
            return {}
        try:
            return {field_name: Entry.decode(raw)}
        except (ValueError, KeyError, TypeError):
            return {}

    async def _listen(self) -> None:
        # A message only says that something changed: the whole state is read again, as
        # it is once subscribed (what changed while not subscribed).
        await listen(
            self._subscriber,
            self._channel,
            on_subscribed=self._read_again,
            on_message=self._read_again,
            on_lost=self._lost,
        )

    async def _read_again(self, *_message: bytes) -> None:
        await self.sync()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self._resync_interval_s)
            try:
                raw_version = await self._redis.get(self._version_key)
                if int(raw_version or 0) != self.state.version or not self._in_sync:
                    await self.sync()
            except (aioredis.RedisError, OSError) as exc:
                self._lost(exc)
            except Exception as exc:  # the resync must outlive any surprise
                log.exception("control resync failed")
                self._lost(exc)
