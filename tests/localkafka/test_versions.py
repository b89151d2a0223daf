"""Every advertised version of every API: a request built from its aiokafka schema gets a
response that decodes with that version's response schema (no field missing)."""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from aiokafka.protocol.api import RequestHeader_v1, ResponseHeader_v0
from aiokafka.protocol.types import (
    Array,
    Boolean,
    Bytes,
    Int8,
    Int16,
    Int32,
    Int64,
    Schema,
    String,
    TaggedFields,
)

from localkafka import Broker
from localkafka.api_doc import DOC, advertised, render
from localkafka.protocol import SUPPORTED

CASES = [
    pytest.param(key, version, id=f"{key.name}-v{version}")
    for key, versions in SUPPORTED.items()
    for version in versions
]


# Values that keep a request off an early error path, so every response field is encoded.
OVERRIDES = {"session_id": 0, "member_id": "", "session_timeout": 10_000}


def sample(field: Any, name: str = "") -> Any:
    """A value for every field: one-element arrays, topic "t", numbers 1 (acks=1, partition
    1, a short max wait, ...)."""
    if name in OVERRIDES:
        return OVERRIDES[name]
    if field is TaggedFields:
        return {}
    if isinstance(field, Schema):
        return tuple(sample(f, n) for n, f in zip(field.names, field.fields, strict=True))
    if isinstance(field, Array):
        return [sample(field.array_of)]
    if isinstance(field, String):
        return "t"
    if field is Bytes:
        return b"x"
    if field is Boolean:
        return False
    if field in (Int8, Int16, Int32, Int64):
        return 1
    raise AssertionError(f"no sample for {field}")


@pytest.mark.parametrize(("key", "version"), CASES)
async def test_each_advertised_version_round_trips(broker: Broker, key: Any, version: int) -> None:
    broker.topics.create("t", 2, {})
    request_struct, response_struct = SUPPORTED[key][version]
    body = request_struct(*sample(request_struct.SCHEMA)).encode()
    header = RequestHeader_v1.SCHEMA.encode([int(key), version, 99, "versions"])
    if request_struct.FLEXIBLE_VERSION:
        header += TaggedFields.encode({})
    frame = await broker._dispatcher.handle(header + body, "127.0.0.1")
    assert frame is not None
    (size,) = struct.unpack(">i", frame[:4])
    assert size == len(frame) - 4
    buffer = BytesIO(frame[4:])
    assert ResponseHeader_v0.decode(buffer).correlation_id == 99
    response_struct.decode(buffer)
    assert buffer.tell() == size


async def test_the_api_table_in_the_docs_is_the_brokers_answer(broker: Broker) -> None:
    live = render(await advertised(broker.port))
    assert DOC.read_text() == live, "run: python -m localkafka.api_doc"
