"""The wire: version negotiation, Kafka's answers to bad requests, the fetch long poll."""

from __future__ import annotations

import asyncio
import random
import struct
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.admin import ApiVersionResponse_v0
from aiokafka.protocol.api import RequestHeader_v1, ResponseHeader_v0
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.metadata import MetadataRequest_v1
from aiokafka.protocol.produce import ProduceRequest

from localkafka import Broker
from localkafka.errors import ErrorCode
from localkafka.protocol import SUPPORTED, ApiKey
from tests.localkafka.conftest import create_topic, eventually, make_batch, produce


def frame(api_key: int, version: int, body: bytes, correlation_id: int = 7) -> bytes:
    header: bytes = RequestHeader_v1.SCHEMA.encode([api_key, version, correlation_id, "raw-test"])
    return struct.pack(">i", len(header) + len(body)) + header + body


async def exchange(port: int, data: bytes) -> bytes | None:
    """Sends ``data``; returns the response frame, or None if the broker closed the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        size = await asyncio.wait_for(reader.read(4), timeout=5)
        if not size:
            return None
        return await reader.readexactly(struct.unpack(">i", size)[0])
    finally:
        writer.close()


async def test_clients_negotiate_exactly_the_advertised_versions(broker: Broker) -> None:
    client = AIOKafkaClient(bootstrap_servers=f"127.0.0.1:{broker.port}")
    await client.bootstrap()
    try:
        conn = await client._get_conn(0)  # the negotiated table of a live connection
        assert conn is not None
        assert conn._versions == {
            int(key): (min(versions), max(versions)) for key, versions in SUPPORTED.items()
        }
    finally:
        await client.close()


async def test_an_unsupported_api_versions_version_is_answered_in_v0(broker: Broker) -> None:
    # ApiVersions v3 is flexible: header v2, tagged fields. Kafka answers in v0 (KIP-511).
    response = await exchange(broker.port, frame(ApiKey.API_VERSIONS, 3, b"\x00\x00\x00\x00"))
    assert response is not None
    header = ResponseHeader_v0.decode(response[:4])
    body = ApiVersionResponse_v0.decode(response[4:])
    assert header.correlation_id == 7
    assert body.error_code == ErrorCode.UNSUPPORTED_VERSION
    assert body.api_versions == [(18, 0, 2)]


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(struct.pack(">i", 40) + b"\x7f" + random.Random(1).randbytes(39), id="random"),
        pytest.param(struct.pack(">i", -5), id="negative-size"),
        pytest.param(frame(999, 0, b""), id="unknown-api"),
        pytest.param(frame(ApiKey.PRODUCE, 99, b""), id="unsupported-version"),
        pytest.param(frame(ApiKey.METADATA, 1, b"\x00\x00\x00\x05\x00"), id="truncated-body"),
        pytest.param(frame(ApiKey.METADATA, 1, MetadataRequest_v1([]).encode() + b"!"), id="extra"),
    ],
)
async def test_a_bad_request_closes_its_connection_and_nothing_else(
    broker: Broker, bootstrap: str, garbage: bytes
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert await create_topic(bootstrap, "still-here", partitions=1) == 0
        assert await exchange(broker.port, garbage) is None
        assert "still-here" in await admin.list_topics()  # an existing connection still works
    finally:
        await admin.close()
    assert await create_topic(bootstrap, "and-new-ones", partitions=1) == 0


async def fetch_once(
    client: AIOKafkaClient, topic: str, offset: int, max_wait_ms: int
) -> tuple[float, tuple[Any, ...]]:
    request = FetchRequest(max_wait_ms, 1, 1 << 20, 0, [(topic, [(0, offset, 1 << 20)])])
    started = time.monotonic()
    response = await client.send(0, request)
    [(_, [partition])] = response.topics
    return time.monotonic() - started, tuple(partition)


async def test_fetch_waits_for_data_up_to_max_wait(broker: Broker, bootstrap: str) -> None:
    await create_topic(bootstrap, "wait", partitions=1)
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        elapsed, empty = await fetch_once(client, "wait", 0, max_wait_ms=300)
        assert 0.25 < elapsed < 2.0
        assert empty[1] == 0 and empty[-1] == b""

        async def produce_later() -> None:
            await asyncio.sleep(0.2)
            await produce(bootstrap, "wait", [(b"k", b"v")])

        later = asyncio.create_task(produce_later())
        elapsed, full = await fetch_once(client, "wait", 0, max_wait_ms=10_000)
        await later
        assert 0.15 < elapsed < 2.0  # answered when the data came, long before 10 s
        assert full[2] == 1 and len(full[-1]) > 0  # high watermark, the batch

        elapsed, _ = await fetch_once(client, "wait", 0, max_wait_ms=10_000)
        assert elapsed < 0.5  # min_bytes already there: no wait at all

        _, beyond = await fetch_once(client, "wait", 5, max_wait_ms=10_000)
        assert beyond[1] == ErrorCode.OFFSET_OUT_OF_RANGE
    finally:
        await client.close()


async def test_produce_answers_per_partition_errors(broker: Broker, bootstrap: str) -> None:
    await create_topic(bootstrap, "checked", partitions=1)
    await create_topic(bootstrap, "damaged", partitions=1)
    good = make_batch([b"one", b"two"])
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        request = ProduceRequest(
            None,
            1,
            5000,
            [("checked", [(0, good)]), ("absent", [(0, good)]), ("damaged", [(0, bytes(corrupt))])],
        )
        response = await client.send(0, request)
        codes = [(topic, p[0][1], p[0][2]) for topic, p in response.topics]
        assert codes == [
            ("checked", ErrorCode.NONE, 0),
            ("absent", ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, -1),
            ("damaged", ErrorCode.CORRUPT_MESSAGE, -1),
        ]
        again = await client.send(0, ProduceRequest(None, -1, 5000, [("damaged", [(0, good)])]))
        assert again.topics[0][1][0][2] == 0  # the corrupt batch was not stored
    finally:
        await client.close()


async def test_acks_zero_is_stored_without_a_response(broker: Broker, bootstrap: str) -> None:
    await create_topic(bootstrap, "fire", partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=0, linger_ms=0)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait("fire", str(i).encode())
    finally:
        await producer.stop()
    log = broker.topics.partition("fire", 0)
    assert log is not None
    await eventually(lambda: log.high_watermark == 5)
