"""aiokafka's producer, consumer (with groups) and admin client against an in-process broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiokafka.errors as kafka_errors
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from localkafka import Broker
from localkafka.errors import LocalKafkaError
from tests.localkafka.conftest import (
    consume,
    consumer,
    create_topic,
    eventually,
    fast_settings,
    produce,
)

SYMBOLS = [b"BTC-USD", b"ETH-USD", b"SOL-USD"]


def keyed(count: int, tag: str = "") -> list[tuple[bytes, bytes]]:
    return [(SYMBOLS[i % 3], f"{tag}{i}".encode()) for i in range(count)]


async def test_what_is_produced_is_consumed_exactly(bootstrap: str) -> None:
    assert await create_topic(bootstrap, "md", partitions=4) == 0
    sent = keyed(600)
    acked = await produce(bootstrap, "md", sent)
    by_key = {k: {acked[v][0] for kk, v in sent if kk == k} for k in SYMBOLS}
    assert all(len(partitions) == 1 for partitions in by_key.values())  # a key, a partition

    reader = consumer(bootstrap, "md", group="g")
    await reader.start()
    try:
        got = await consume(reader, len(sent))
    finally:
        await reader.stop()
    assert len(got) == len(sent)
    assert {v: (p, o) for p, o, _, v in got} == acked
    assert {v: k for _, _, k, v in got} == {v: k for k, v in sent}
    for partition in range(4):  # each partition in produce order, offsets from 0 without gaps
        offsets = [o for p, o, _, _ in got if p == partition]
        assert offsets == list(range(len(offsets)))


async def test_two_members_split_the_partitions_and_one_takes_all_when_the_other_leaves(
    bootstrap: str,
) -> None:
    await create_topic(bootstrap, "split", partitions=4)
    first = consumer(bootstrap, "split", group="pair")
    second = consumer(bootstrap, "split", group="pair")
    await first.start()
    await second.start()
    try:

        async def balanced() -> bool:
            await asyncio.gather(first.getmany(timeout_ms=50), second.getmany(timeout_ms=50))
            mine, theirs = first.assignment(), second.assignment()
            return len(mine) == len(theirs) == 2 and not mine & theirs

        await eventually(balanced)
        await second.stop()  # LeaveGroup

        async def first_has_all() -> bool:
            await first.getmany(timeout_ms=50)
            return len(first.assignment()) == 4

        await eventually(first_has_all)
        sent = keyed(90, "after-")
        await produce(bootstrap, "split", sent)
        got = await consume(first, len(sent))
        assert sorted(v for _, _, _, v in got) == sorted(v for _, v in sent)
    finally:
        await first.stop()
        await second.stop()


@pytest.mark.timed  # a fetch answered within a second
async def test_a_waiting_fetch_returns_as_soon_as_data_arrives(bootstrap: str) -> None:
    await create_topic(bootstrap, "poll", partitions=1)
    reader = consumer(bootstrap, "poll", group="poller", fetch_max_wait_ms=5000)
    await reader.start()
    try:
        await eventually(lambda: bool(reader.assignment()))
        await asyncio.sleep(0.3)  # the consumer's fetch is now parked on the broker
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        await producer.start()
        try:
            sent_at = time.monotonic()
            await producer.send_and_wait("poll", b"now")
        finally:
            await producer.stop()
        record = await asyncio.wait_for(reader.getone(), timeout=10)
        assert record.value == b"now"
        assert time.monotonic() - sent_at < 1.0  # not the 5 s max wait
    finally:
        await reader.stop()


async def test_admin_create_describe_and_delete(bootstrap: str) -> None:
    assert (
        await create_topic(bootstrap, "made", partitions=2, configs={"retention.ms": "5000"}) == 0
    )
    assert kafka_errors.for_code(await create_topic(bootstrap, "made")) is (
        kafka_errors.TopicAlreadyExistsError
    )
    bad_config = await create_topic(bootstrap, "bad", configs={"retention.bytes": "1"})
    assert kafka_errors.for_code(bad_config) is kafka_errors.InvalidConfigurationError
    assert kafka_errors.for_code(await create_topic(bootstrap, "bad name!")) is (
        kafka_errors.InvalidTopicError
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics(["made"])
        assert (described["error_code"], len(described["partitions"])) == (0, 2)
        assert "made" in await admin.list_topics()
        [missing] = await admin.describe_topics(["never-made"])
        assert kafka_errors.for_code(missing["error_code"]) is (
            kafka_errors.UnknownTopicOrPartitionError
        )
        response = await admin.delete_topics(["made"])
        assert response.topic_error_codes == [("made", 0)]
        assert "made" not in await admin.list_topics()
    finally:
        await admin.close()


async def test_delete_records_moves_the_earliest_offset(bootstrap: str) -> None:
    await create_topic(bootstrap, "trim", partitions=1)
    await produce(bootstrap, "trim", keyed(20))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        low = await admin.delete_records({TopicPartition("trim", 0): RecordsToDelete(12)})
        assert low == {TopicPartition("trim", 0): 12}
    finally:
        await admin.close()
    reader = consumer(bootstrap, "trim", group=None)
    await reader.start()
    try:
        tp = TopicPartition("trim", 0)
        assert await reader.beginning_offsets([tp]) == {tp: 12}
        assert await reader.end_offsets([tp]) == {tp: 20}
        got = await consume(reader, 8)
        assert [o for _, o, _, _ in got] == list(range(12, 20))
    finally:
        await reader.stop()


async def test_offsets_for_times(bootstrap: str) -> None:
    await create_topic(bootstrap, "times", partitions=1)
    await produce(bootstrap, "times", keyed(5, "early-"))
    await asyncio.sleep(0.05)
    middle_ms = int(time.time() * 1000)
    await asyncio.sleep(0.05)
    await produce(bootstrap, "times", keyed(5, "late-"))
    reader = consumer(bootstrap, "times", group=None)
    await reader.start()
    try:
        tp = TopicPartition("times", 0)
        found = (await reader.offsets_for_times({tp: middle_ms}))[tp]
        assert found is not None and found.offset == 5 and found.timestamp >= middle_ms
        assert (await reader.offsets_for_times({tp: middle_ms + 3_600_000}))[tp] is None
    finally:
        await reader.stop()


async def test_retention_frees_old_segments_while_a_consumer_keeps_reading(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path / "data", retention_check_interval_ms=50)
    async with Broker(settings) as broker:
        bootstrap = f"127.0.0.1:{broker.port}"
        configs = {"retention.ms": "300", "segment.bytes": "4096"}
        assert await create_topic(bootstrap, "short", partitions=1, configs=configs) == 0
        reader = consumer(bootstrap, "short", group="reader")
        await reader.start()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
        await producer.start()
        try:
            sent = []
            got: list[bytes] = []
            for i in range(150):  # about 1.5 s of production
                value = f"{i:05d}".encode() + b"x" * 200
                await producer.send_and_wait("short", value)
                sent.append(value)
                got.extend(
                    r.value for rs in (await reader.getmany(timeout_ms=1)).values() for r in rs
                )
                await asyncio.sleep(0.01)
            got.extend(v for _, _, _, v in await consume(reader, len(sent) - len(got)))
            log = broker.topics.partition("short", 0)
            assert log is not None
            assert got == sent  # nothing skipped: the reader kept up with retention
            assert log.log_start_offset > len(sent) / 2  # most of it is gone from disk
            files = list((tmp_path / "data" / "topics" / "short" / "0").glob("*.log"))
            assert len(files) == log.segment_count
        finally:
            await producer.stop()
            await reader.stop()


async def test_unknown_topics_are_created_only_when_allowed(tmp_path: Path) -> None:
    async with Broker(fast_settings(tmp_path / "a")) as strict:
        admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{strict.port}")
        await admin.start()
        try:
            [entry] = await admin.describe_topics(["auto"])
            assert entry["error_code"] == kafka_errors.UnknownTopicOrPartitionError.errno
        finally:
            await admin.close()
    settings = fast_settings(tmp_path / "b", auto_create_topics=True, default_partitions=3)
    async with Broker(settings) as lenient:
        acked = await produce(f"127.0.0.1:{lenient.port}", "auto", [(b"k", b"v")])
        assert acked[b"v"][1] == 0
        topic = lenient.topics.get("auto")
        assert topic is not None and len(topic.partitions) == 3


async def test_topics_configs_and_data_survive_a_restart_in_process(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path / "data")
    async with Broker(settings) as first:
        bootstrap = f"127.0.0.1:{first.port}"
        configs = {"retention.ms": "3600000", "segment.bytes": "65536"}
        assert await create_topic(bootstrap, "kept", partitions=3, configs=configs) == 0
        acked = await produce(bootstrap, "kept", keyed(30))
    async with Broker(settings) as second:
        bootstrap = f"127.0.0.1:{second.port}"
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            [described] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, "kept")]
            )
            [(error, _, _, name, entries)] = described.resources
            assert (error, name) == (0, "kept")
            values = {entry[0]: entry[1] for entry in entries}
            assert values["retention.ms"] == "3600000"
            assert values["segment.bytes"] == "65536"
            [broker_configs] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.BROKER, "0")]
            )
            assert broker_configs.resources[0][0] == 0
        finally:
            await admin.close()
        reader = consumer(bootstrap, "kept", group=None)
        await reader.start()
        try:
            got = await consume(reader, len(acked))
        finally:
            await reader.stop()
        assert {v: (p, o) for p, o, _, v in got} == acked


async def test_one_data_dir_serves_one_broker(broker: Broker) -> None:
    with pytest.raises(LocalKafkaError, match="in use"):
        await Broker(broker.settings).start()
