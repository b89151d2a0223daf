"""The broker: the listening socket, one task per connection, and the periodic chores.

``start()`` locks the data dir (two brokers never share one), repairs and indexes the logs,
then listens; ``stop()`` closes every connection and fsyncs everything written. A
connection's requests are answered one at a time, in order, as Kafka does; a frame that
cannot be read closes that connection only, and nothing a client sends stops the broker.
Chores: fsync, retention and group session expiry. What clients see: docs/kafka-apis.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

from localkafka.coordinator import GroupCoordinator
from localkafka.dispatch import Dispatcher
from localkafka.errors import LocalKafkaError, MalformedRequestError
from localkafka.fsutil import fsync_and_close, write_atomic
from localkafka.handlers.cluster import ClusterHandlers
from localkafka.handlers.data import DataHandlers
from localkafka.handlers.groups import GroupHandlers
from localkafka.offsets import OffsetStore
from localkafka.producers import ProducerIds
from localkafka.settings import BrokerSettings
from localkafka.topics import TopicStore

log = logging.getLogger(__name__)

_EXPIRY_INTERVAL_S = 0.1


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _cluster_id(data_dir: Path) -> str:
    path = data_dir / "cluster.json"
    if path.exists():
        return str(json.loads(path.read_text())["cluster_id"])
    cluster_id = uuid.uuid4().hex
    write_atomic(path, json.dumps({"cluster_id": cluster_id}).encode())
    return cluster_id


class Broker:
    def __init__(
        self, settings: BrokerSettings, *, clock_ms: Callable[[], int] = _wall_clock_ms
    ) -> None:
        self.settings = settings
        self._clock_ms = clock_ms
        self.topics = TopicStore(settings.data_dir, settings.log_defaults)
        self.offsets = OffsetStore(settings.data_dir)
        self.producer_ids = ProducerIds(settings.data_dir)
        self.coordinator = GroupCoordinator(settings.groups)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[object]] = set()
        self._chores: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._lock_fd = -1
        self._started = False
        self._stopped = False
        self.port = settings.port
        """The port listened on (the one picked when ``settings.port`` is 0)."""

    async def start(self) -> None:
        """Opens the data dir (an exclusive ``flock`` on it), repairs and indexes the logs,
        loads committed offsets, then listens."""
        if self._started:
            return
        self._started = True
        try:
            await self._open()
        except BaseException:
            self._stopped = True
            self._stopping.set()
            await asyncio.gather(*self._chores, return_exceptions=True)
            if self._server is not None:
                self._server.close()
            self._release()
            raise
        log.info(
            "listening on %s:%d, data in %s", self.settings.host, self.port, self.settings.data_dir
        )

    async def _open(self) -> None:
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise LocalKafkaError(f"{data_dir} is in use by another broker") from None
        self.topics.open()
        self.offsets.open()
        self.producer_ids.open(at_least=self.topics.highest_producer_id() + 1)
        cluster = ClusterHandlers(self.topics, self.offsets, self.settings, _cluster_id(data_dir))
        self._dispatcher = Dispatcher(
            {
                **DataHandlers(self.topics, self.settings, self.producer_ids).routes(),
                **cluster.routes(),
                **GroupHandlers(self.coordinator, self.offsets, self.topics).routes(),
            }
        )
        self._server = await asyncio.start_server(
            self._serve, self.settings.host, self.settings.port, start_serving=False
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        cluster.address = (self.settings.advertised_host or self.settings.host, self.port)
        self._chores = [
            asyncio.create_task(self._every(self.settings.fsync_interval_ms / 1000, self._flush)),
            asyncio.create_task(
                self._every(self.settings.retention_check_interval_ms / 1000, self._retention)
            ),
            asyncio.create_task(self._every(_EXPIRY_INTERVAL_S, self._expire)),
        ]
        await self._server.start_serving()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        try:
            # One request at a time, in order, as Kafka does: a client that wants concurrency
            # opens more connections (aiokafka does, for group coordination).
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big", signed=True)
                if not 0 < size <= self.settings.max_request_bytes:
                    raise MalformedRequestError(f"request frame of {size} bytes")
                frame = await reader.readexactly(size)
                response = await self._dispatcher.handle(frame, host)
                if response is not None:
                    writer.write(response)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection
        except asyncio.CancelledError:
            # stop() cancels connections. Ending normally: asyncio's stream callback logs a
            # cancelled connection task as an error (Python 3.11).
            pass
        except MalformedRequestError as exc:
            log.warning("closing the connection from %s: %s", peer, exc)
        except Exception:  # the boundary: one request's failure ends its connection only
            log.warning("closing the connection from %s: request failed", peer, exc_info=True)
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    async def _every(self, interval_s: float, chore: Callable[[], Awaitable[None]]) -> None:
        """Runs ``chore`` every ``interval_s`` until stop; a failing run is logged, not fatal."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)
                return
            try:
                await chore()
            except Exception:  # a chore fails alone; the broker keeps serving
                log.exception("periodic %s failed", getattr(chore, "__name__", chore))

    async def _flush(self) -> None:
        fds = self.topics.dup_dirty()
        offsets_fd = self.offsets.dup_if_dirty()
        if offsets_fd is not None:
            fds.append(offsets_fd)
        if fds:
            await asyncio.to_thread(fsync_and_close, fds)

    async def _retention(self) -> None:
        self.topics.enforce_retention(self._clock_ms())

    async def _expire(self) -> None:
        self.coordinator.expire()

    async def stop(self) -> None:
        """Idempotent: stops accepting, closes every connection, finishes a running fsync,
        fsyncs everything written and closes the files."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, *self._chores, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self.coordinator.close()
        self.topics.fsync()
        self._release()
        log.info("stopped; data fsynced in %s", self.settings.data_dir)

    def _release(self) -> None:
        self.topics.close()
        self.offsets.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
