"""An in-process broker per test, broker subprocesses for the crash tests, record helpers."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from core.processes import ManagedProcess, free_port, listening, start_ready, stop_all
from localkafka import Broker, BrokerSettings
from localkafka.group import GroupSettings
from tests.conftest import REPO


def make_batch(
    values: list[bytes],
    timestamp_ms: int = 1_700_000_000_000,
    key: bytes | None = None,
    producer: tuple[int, int, int] = (-1, -1, -1),
) -> bytes:
    """A v2 record batch as a producer sends it (base offset 0); ``producer`` is an
    idempotent producer's (id, epoch, first sequence)."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, *producer, 10_000_000)
    for index, value in enumerate(values):
        builder.append(index, timestamp=timestamp_ms + index, key=key, value=value, headers=[])
    return bytes(builder.build())


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0
) -> None:
    """Polls ``condition`` (plain or async) until it holds; fails the test after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def fast_settings(data_dir: Path, **changes: object) -> BrokerSettings:
    """Settings for tests: a free port, chores every 100 ms, short sessions allowed."""
    base: dict[str, object] = {
        "data_dir": data_dir,
        "port": 0,
        "retention_check_interval_ms": 100,
        "fsync_interval_ms": 100,
        "groups": GroupSettings(min_session_timeout_ms=100),
    }
    return BrokerSettings(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    async with Broker(fast_settings(tmp_path / "data")) as running:
        yield running


@pytest.fixture
def bootstrap(broker: Broker) -> str:
    return f"127.0.0.1:{broker.port}"


async def create_topic(
    bootstrap: str, name: str, partitions: int = 4, configs: dict[str, str] | None = None
) -> int:
    """Creates a topic; returns the response's error code (0: created)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs=configs or {})]
        )
        return int(response.topic_errors[0][1])
    finally:
        await admin.close()


async def produce(
    bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]
) -> dict[bytes, tuple[int, int]]:
    """Sends (key, value) records with acks=all; returns value -> (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in records]
        acked = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return {v: (md.partition, md.offset) for (_, v), md in zip(records, acked, strict=True)}


def consumer(bootstrap: str, topic: str, group: str | None, **options: object) -> AIOKafkaConsumer:
    """A consumer with fast group timings, reading from the earliest offset by default."""
    settings: dict[str, object] = {
        "bootstrap_servers": bootstrap,
        "group_id": group,
        "auto_offset_reset": "earliest",
        "heartbeat_interval_ms": 100,
        "session_timeout_ms": 6000,
        "retry_backoff_ms": 50,
        **options,
    }
    return AIOKafkaConsumer(topic, **settings)


async def consume(
    source: AIOKafkaConsumer, count: int, timeout_s: float = 15.0
) -> list[tuple[int, int, bytes | None, bytes]]:
    """At least ``count`` records as (partition, offset, key, value)."""
    got: list[tuple[int, int, bytes | None, bytes]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        assert time.monotonic() < deadline, f"consumed {len(got)} of {count}"
        batches = await source.getmany(timeout_ms=200)
        for records in batches.values():
            got.extend((r.partition, r.offset, r.key, r.value) for r in records)
    return got


class BrokerProcess:
    """``python -m localkafka`` as a real process on a fixed port and data dir."""

    def __init__(self, data_dir: Path, run_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self._run_dir = run_dir
        self._extra = extra
        self._starts = 0
        self.proc = self._new()

    def _new(self) -> ManagedProcess:
        self._starts += 1
        argv = [
            sys.executable, "-m", "localkafka",
            "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
            "--log-level", "INFO", *self._extra,
        ]  # fmt: skip
        log_path = self._run_dir / f"localkafka-{self._starts}.log"
        return ManagedProcess("localkafka", argv, cwd=REPO, log_path=log_path)

    def start(self) -> None:
        start_ready(self.proc, listening(self.port), timeout_s=15)

    def terminate(self) -> int:
        """SIGTERM; returns the exit code."""
        self.proc.signal_group(signal.SIGTERM)
        return self.proc.wait(timeout_s=10)

    def restart_after(self, how: signal.Signals) -> int | None:
        """Stops by SIGTERM (returns the exit code) or SIGKILL, then starts again."""
        code = None
        if how is signal.SIGKILL:
            self.proc.kill()
        else:
            code = self.terminate()
        self.proc = self._new()
        self.start()
        return code


@pytest.fixture
def broker_process(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Starts broker processes; every one is stopped at the end of the test."""
    started: list[BrokerProcess] = []

    def _start(*extra: str) -> BrokerProcess:
        process = BrokerProcess(tmp_path / f"data-{len(started)}", tmp_path, *extra)
        started.append(process)
        process.start()
        return process

    try:
        yield _start
    finally:
        stop_all(process.proc for process in started)
