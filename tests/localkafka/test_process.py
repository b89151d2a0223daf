"""``python -m localkafka`` as a real process: stopped, killed and restarted under clients."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from tests.localkafka.conftest import (
    BrokerProcess,
    consume,
    consumer,
    create_topic,
    eventually,
    produce,
)
from tests.localkafka.test_clients import SYMBOLS, keyed
from tests.localkafka.test_wire import exchange

pytestmark = pytest.mark.integration

RESTARTS = [pytest.param(signal.SIGTERM, id="sigterm"), pytest.param(signal.SIGKILL, id="sigkill")]

Record = tuple[int, int, bytes | None, bytes]


@pytest.mark.parametrize("how", RESTARTS)
async def test_committed_offsets_survive_a_restart_and_the_group_resumes_there(
    broker_process: Callable[..., BrokerProcess], how: signal.Signals
) -> None:
    broker = broker_process()
    await create_topic(broker.bootstrap, "orders", partitions=4)
    sent = keyed(200)
    await produce(broker.bootstrap, "orders", sent)

    first_reader = consumer(broker.bootstrap, "orders", group="resume", enable_auto_commit=False)
    await first_reader.start()
    try:
        first = await consume(first_reader, 120)
        committed: dict[int, int] = {}
        for partition, offset, _, _ in first:
            committed[partition] = max(committed.get(partition, 0), offset + 1)
        await first_reader.commit({TopicPartition("orders", p): o for p, o in committed.items()})
    finally:
        await first_reader.stop()

    exit_code = await asyncio.to_thread(broker.restart_after, how)
    if how is signal.SIGTERM:
        assert exit_code == 0

    reader = consumer(broker.bootstrap, "orders", group="resume", enable_auto_commit=False)
    await reader.start()
    try:
        rest = await consume(reader, len(sent) - len(first))
        rest += [
            (r.partition, r.offset, r.key, r.value)
            for records in (await reader.getmany(timeout_ms=300)).values()
            for r in records
        ]
    finally:
        await reader.stop()
    for partition in range(4):
        resumed = [o for p, o, _, _ in rest if p == partition]
        if resumed:
            assert resumed[0] == committed.get(partition, 0)  # exactly at the commit
    everything = sorted((p, o, v) for p, o, _, v in first + rest)
    assert len(everything) == len(set(everything)) == len(sent)  # no loss, no duplicate


@pytest.mark.parametrize("how", RESTARTS)
async def test_a_producer_keeps_producing_across_a_restart_and_nothing_acked_is_lost(
    broker_process: Callable[..., BrokerProcess], how: signal.Signals
) -> None:
    broker = broker_process()
    await create_topic(broker.bootstrap, "flow", partitions=4)
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap,
        acks="all",
        linger_ms=5,
        request_timeout_ms=15_000,
        retry_backoff_ms=50,
    )
    await producer.start()
    live_reader = consumer(broker.bootstrap, "flow", group="through", session_timeout_ms=10_000)
    await live_reader.start()
    futures: list[tuple[bytes, asyncio.Future[object]]] = []
    restarted_at = 0

    async def send_steadily() -> None:
        for i in range(300):
            value = f"m{i:04d}".encode()
            futures.append((value, await producer.send("flow", key=SYMBOLS[i % 3], value=value)))
            await asyncio.sleep(0.005)

    async def restart_midway() -> None:
        nonlocal restarted_at
        await asyncio.sleep(0.5)
        restarted_at = len(futures)
        await asyncio.to_thread(broker.restart_after, how)

    try:
        await asyncio.gather(send_steadily(), restart_midway())
        acked: dict[bytes, tuple[int, int]] = {}
        for value, future in futures:
            try:
                metadata = await future
            except KafkaError:
                continue
            acked[value] = (metadata.partition, metadata.offset)  # type: ignore[attr-defined]
        # A group member that lived through the restart rejoined and got everything too.
        through: set[bytes] = set()

        async def got_all_acked() -> bool:
            batches = await live_reader.getmany(timeout_ms=100)
            through.update(r.value for records in batches.values() for r in records)
            return set(acked) <= through

        await eventually(got_all_acked, timeout_s=30)
    finally:
        await producer.stop()
        await live_reader.stop()
    assert 0 < restarted_at < len(futures)
    assert len(acked) == len(futures)  # the producer retried through the restart

    reader = consumer(broker.bootstrap, "flow", group=None)
    await reader.start()
    try:
        stored = {(p, o): v for p, o, _, v in await consume(reader, len(acked))}
        stored.update(
            ((r.partition, r.offset), r.value)
            for records in (await reader.getmany(timeout_ms=300)).values()
            for r in records
        )
    finally:
        await reader.stop()
    for value, position in acked.items():
        assert stored.get(position) == value


async def test_garbage_does_not_take_the_process_down(
    broker_process: Callable[..., BrokerProcess],
) -> None:
    broker = broker_process()
    assert await exchange(broker.port, b"\x00\x00\x00\x10" + b"\xff" * 16) is None
    assert await exchange(broker.port, b"\x7f\xff\xff\xff") is None  # a 2 GiB frame
    assert broker.proc.running()
    assert await create_topic(broker.bootstrap, "alive", partitions=1) == 0
    assert broker.terminate() == 0
