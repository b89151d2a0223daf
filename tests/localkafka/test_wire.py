"""The wire: version negotiation, Kafka's answers to bad requests, the fetch long poll."""

from __future__ import annotations

import asyncio
import random
import struct
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.admin import (
    ApiVersionResponse_v0,
    CreatePartitionsRequest_v0,
    CreatePartitionsResponse_v0,
    ListGroupsResponse_v1,
)
from aiokafka.protocol.api import RequestHeader_v1, RequestHeader_v2, ResponseHeader_v0
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.metadata import MetadataRequest_v1
from aiokafka.protocol.produce import ProduceRequest, ProduceRequest_v2, ProduceResponse_v2
from aiokafka.protocol.transaction import InitProducerIdRequest

from localkafka import Broker
from localkafka.errors import ErrorCode
from localkafka.protocol import (
    SUPPORTED,
    ApiKey,
    ApiVersionRequest_v3,
    ApiVersionResponse_v3,
)
from localkafka.records import split_batches
from tests.localkafka.conftest import create_topic, eventually, fast_settings, make_batch, produce

pytestmark = pytest.mark.timed  # the broker's waits, measured against the wall clock


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
    # A version newer than the broker's: Kafka answers in v0 (KIP-511), whatever it is.
    response = await exchange(broker.port, frame(ApiKey.API_VERSIONS, 4, b"\x00\x00\x00\x00"))
    assert response is not None
    header = ResponseHeader_v0.decode(response[:4])
    body = ApiVersionResponse_v0.decode(response[4:])
    assert header.correlation_id == 7
    assert body.error_code == ErrorCode.UNSUPPORTED_VERSION
    assert body.api_versions == [(18, 0, 3)]


async def test_api_versions_v3_is_answered_in_the_flexible_format(broker: Broker) -> None:
    # Header v2 (tagged fields after the client id), as librdkafka and the Java clients send.
    request = ApiVersionRequest_v3("librdkafka", "2.16.0", {})
    header = RequestHeader_v2(request, correlation_id=11, client_id="flex").encode()
    data = header + request.encode()
    response = await exchange(broker.port, struct.pack(">i", len(data)) + data)
    assert response is not None
    buffer = BytesIO(response)
    assert ResponseHeader_v0.decode(buffer).correlation_id == 11  # v0 even here (KIP-511)
    body = ApiVersionResponse_v3.decode(buffer)
    assert buffer.tell() == len(response)
    assert body.error_code == 0
    assert {(key, low, high) for key, low, high, _ in body.api_versions} == {
        (int(key), min(v), max(v)) for key, v in SUPPORTED.items()
    }


async def exchange_on_one_connection(port: int, frames: list[bytes]) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    responses = []
    try:
        for data in frames:
            writer.write(data)
            await writer.drain()
            size = struct.unpack(">i", await asyncio.wait_for(reader.readexactly(4), 5))[0]
            responses.append(await reader.readexactly(size))
    finally:
        writer.close()
    return responses


async def test_an_api_not_served_gets_unsupported_version_and_the_connection_stays(
    broker: Broker,
) -> None:
    create_partitions = CreatePartitionsRequest_v0([("t", (2, []))], 1000, False).encode()
    metadata = MetadataRequest_v1([]).encode()
    not_served, served = await exchange_on_one_connection(
        broker.port,
        [frame(37, 0, create_partitions, correlation_id=1), frame(3, 1, metadata, 2)],
    )
    buffer = BytesIO(not_served)
    assert ResponseHeader_v0.decode(buffer).correlation_id == 1
    body = CreatePartitionsResponse_v0.decode(buffer)
    assert body.throttle_time_ms == 0 and body.topic_errors == []
    assert ResponseHeader_v0.decode(served[:4]).correlation_id == 2


async def test_errors_are_answered_for_each_partition_the_request_named(
    broker: Broker, bootstrap: str
) -> None:
    """A response schema without a top-level error field carries the error per partition:
    an empty answer would read as success, and a producer would wait for its batch."""
    await create_topic(bootstrap, "named", partitions=2)
    batch = make_batch([b"a"])
    old = ProduceRequest_v2(1, 5000, [("named", [(0, batch), (1, batch)])]).encode()
    [unserved] = await exchange_on_one_connection(broker.port, [frame(0, 2, old)])
    buffer = BytesIO(unserved)
    ResponseHeader_v0.decode(buffer)
    answer = ProduceResponse_v2.decode(buffer)
    assert [(t, [(p, e) for p, e, *_ in parts]) for t, parts in answer.topics] == [
        ("named", [(0, ErrorCode.UNSUPPORTED_VERSION), (1, ErrorCode.UNSUPPORTED_VERSION)])
    ]

    async def broken(context: Any, request: Any) -> Any:
        raise RuntimeError("a bug")

    broker._dispatcher._routes[ApiKey.PRODUCE] = broken
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        response = await client.send(0, ProduceRequest(None, 1, 5000, [("named", [(1, batch)])]))
    finally:
        await client.close()
    assert [(t, [(p, e) for p, e, *_ in parts]) for t, parts in response.topics] == [
        ("named", [(1, ErrorCode.UNKNOWN_SERVER_ERROR)])
    ]


async def test_a_failing_handler_answers_unknown_server_error(broker: Broker) -> None:
    async def broken(context: Any, request: Any) -> Any:
        raise RuntimeError("a bug")

    broker._dispatcher._routes[ApiKey.LIST_GROUPS] = broken
    failed, again = await exchange_on_one_connection(
        broker.port, [frame(16, 1, b"", correlation_id=1), frame(16, 1, b"", correlation_id=2)]
    )
    for response, correlation_id in ((failed, 1), (again, 2)):
        buffer = BytesIO(response)
        assert ResponseHeader_v0.decode(buffer).correlation_id == correlation_id
        body = ListGroupsResponse_v1.decode(buffer)
        assert (body.error_code, body.groups) == (ErrorCode.UNKNOWN_SERVER_ERROR, [])


async def test_producer_ids_are_never_reused_and_transactions_are_refused(
    tmp_path: Path,
) -> None:
    settings = fast_settings(tmp_path / "data")
    ids = []
    for restart in range(3):  # the last one after the ids file was lost
        if restart == 2:
            (settings.data_dir / "producer-ids").unlink()
        async with Broker(settings) as running:
            client = AIOKafkaClient(bootstrap_servers=f"127.0.0.1:{running.port}")
            await client.bootstrap()
            try:
                for _ in range(2):
                    response = await client.send(0, InitProducerIdRequest(None, 60_000))
                    assert (response.error_code, response.producer_epoch) == (0, 0)
                    ids.append(response.producer_id)
                refused = await client.send(0, InitProducerIdRequest("tx", 60_000))
                assert refused.error_code == ErrorCode.TRANSACTIONAL_ID_AUTHORIZATION_FAILED
                running.topics.create(f"written-{restart}", 1, {})
                log = running.topics.partition(f"written-{restart}", 0)
                assert log is not None
                data = make_batch([b"x"], producer=(ids[-1], 0, 0))
                log.append(data, split_batches(data, 1 << 20))
            finally:
                await client.close()
    assert len(set(ids)) == 6  # the logs still held the highest id handed out


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


async def test_a_resent_idempotent_batch_is_answered_with_its_offset_once_written(
    broker: Broker, bootstrap: str
) -> None:
    await create_topic(bootstrap, "once", partitions=1)
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        id_response = await client.send(0, InitProducerIdRequest(None, 60_000))
        producer = (id_response.producer_id, id_response.producer_epoch, 0)
        first = make_batch([b"a", b"b"], producer=producer)
        offsets = []
        for data in (first, first, make_batch([b"c"], producer=(producer[0], 0, 2))):
            response = await client.send(0, ProduceRequest(None, -1, 5000, [("once", [(0, data)])]))
            [(_, [(_, error, offset, *_)])] = response.topics
            offsets.append((error, offset))
        gap = make_batch([b"x"], producer=(producer[0], 0, 9))
        response = await client.send(0, ProduceRequest(None, -1, 5000, [("once", [(0, gap)])]))
        refused = response.topics[0][1][0][1]
    finally:
        await client.close()
    assert offsets == [(0, 0), (0, 0), (0, 2)]
    assert refused == ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER
    log = broker.topics.partition("once", 0)
    assert log is not None and log.high_watermark == 3
