"""The Kafka APIs and versions the broker serves, and their codec, all on aiokafka's structs.

Requests are decoded with aiokafka's ``*Request_vN`` structs into plain dicts
(``to_object``); handlers answer with dicts that hold every field any served version of
the response has, and ``encode_response`` picks the fields of the negotiated version's
``*Response_vN`` schema. Only non-flexible versions are served, so every request header is
``RequestHeader_v1`` and every response header ``ResponseHeader_v0``.

Version ranges: the newest aiokafka 0.14 can build, non-flexible. Kafka defines JoinGroup
v3/v4 and SyncGroup v2 with the same wire format as the version before, so those decode
with that struct (JoinGroup v4+ adds MEMBER_ID_REQUIRED, handled by the coordinator).
ListOffsets stops at v3: aiokafka's v4 struct cannot be built by its own request builder.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO
from types import ModuleType
from typing import Any

from aiokafka.protocol import (
    admin,
    commit,
    coordination,
    fetch,
    group,
    metadata,
    offset,
    produce,
)
from aiokafka.protocol.api import RequestHeader_v1, ResponseHeader_v0
from aiokafka.protocol.types import Array, Schema

from localkafka.errors import MalformedRequestError

Body = dict[str, Any]


class ApiKey(IntEnum):
    PRODUCE = 0
    FETCH = 1
    LIST_OFFSETS = 2
    METADATA = 3
    OFFSET_COMMIT = 8
    OFFSET_FETCH = 9
    FIND_COORDINATOR = 10
    JOIN_GROUP = 11
    HEARTBEAT = 12
    LEAVE_GROUP = 13
    SYNC_GROUP = 14
    API_VERSIONS = 18
    CREATE_TOPICS = 19
    DELETE_TOPICS = 20
    DELETE_RECORDS = 21
    DESCRIBE_CONFIGS = 32


StructPair = tuple[Any, Any]  # (aiokafka request struct class, response struct class)


def _versions(
    module: ModuleType, stem: str, low: int, high: int, same_as: Mapping[int, int] | None = None
) -> dict[int, StructPair]:
    pairs = {}
    for version in range(low, high + 1):
        source = (same_as or {}).get(version, version)
        pairs[version] = (
            getattr(module, f"{stem}Request_v{source}"),
            getattr(module, f"{stem}Response_v{source}"),
        )
    return pairs


SUPPORTED: dict[ApiKey, dict[int, StructPair]] = {
    ApiKey.PRODUCE: _versions(produce, "Produce", 3, 8),
    ApiKey.FETCH: _versions(fetch, "Fetch", 4, 11),
    ApiKey.LIST_OFFSETS: _versions(offset, "Offset", 1, 3),
    ApiKey.METADATA: _versions(metadata, "Metadata", 1, 5),
    ApiKey.OFFSET_COMMIT: _versions(commit, "OffsetCommit", 2, 3),
    ApiKey.OFFSET_FETCH: _versions(commit, "OffsetFetch", 1, 3),
    ApiKey.FIND_COORDINATOR: _versions(coordination, "FindCoordinator", 0, 1),
    ApiKey.JOIN_GROUP: _versions(group, "JoinGroup", 0, 5, {3: 2, 4: 2}),
    ApiKey.HEARTBEAT: _versions(group, "Heartbeat", 0, 1),
    ApiKey.LEAVE_GROUP: _versions(group, "LeaveGroup", 0, 1),
    ApiKey.SYNC_GROUP: _versions(group, "SyncGroup", 0, 3, {2: 1}),
    ApiKey.API_VERSIONS: _versions(admin, "ApiVersion", 0, 2),
    ApiKey.CREATE_TOPICS: _versions(admin, "CreateTopics", 0, 3),
    ApiKey.DELETE_TOPICS: _versions(admin, "DeleteTopics", 0, 3),
    ApiKey.DELETE_RECORDS: _versions(admin, "DeleteRecords", 0, 1),
    ApiKey.DESCRIBE_CONFIGS: _versions(admin, "DescribeConfigs", 0, 2),
}


def advertised_versions() -> list[Body]:
    """The ApiVersions entries: each API with the lowest and highest version served."""
    return [
        {"api_key": int(key), "min_version": min(v), "max_version": max(v)}
        for key, v in SUPPORTED.items()
    ]


@dataclass(frozen=True)
class RequestContext:
    api_key: ApiKey
    api_version: int
    correlation_id: int
    client_id: str
    client_host: str


Handler = Callable[[RequestContext, Body], Awaitable[Body | None]]
"""Answers a decoded request with a response body, or None when none is to be sent."""


@dataclass(frozen=True)
class Header:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str


def decode_header(buffer: BytesIO) -> Header:
    try:
        api_key, api_version, correlation_id, client_id = RequestHeader_v1.SCHEMA.decode(buffer)
    except Exception as exc:  # aiokafka's decoders raise ValueError, struct.error, ...
        raise MalformedRequestError(f"undecodable request header: {exc!r}") from exc
    return Header(api_key, api_version, correlation_id, client_id or "")


def decode_body(request_struct: Any, buffer: BytesIO, size: int) -> Body:
    try:
        decoded = request_struct.decode(buffer)
    except Exception as exc:  # aiokafka's decoders raise ValueError, struct.error, ...
        raise MalformedRequestError(f"undecodable {request_struct.__name__}: {exc!r}") from exc
    if buffer.tell() != size:
        raise MalformedRequestError(
            f"{request_struct.__name__}: {size - buffer.tell()} bytes left over"
        )
    body: Body = decoded.to_object()
    return body


def _values(schema: Any, body: Mapping[str, Any]) -> list[Any]:
    values = []
    for name, field in zip(schema.names, schema.fields, strict=True):
        value = body[name]
        if isinstance(field, Schema):
            value = tuple(_values(field, value))
        elif isinstance(field, Array) and isinstance(field.array_of, Schema) and value is not None:
            value = [tuple(_values(field.array_of, item)) for item in value]
        values.append(value)
    return values


def encode_response(response_struct: Any, correlation_id: int, body: Mapping[str, Any]) -> bytes:
    """The size-prefixed frame of ``body`` in ``response_struct``'s schema."""
    encoded: bytes = (
        ResponseHeader_v0(correlation_id).encode()
        + response_struct(*_values(response_struct.SCHEMA, body)).encode()
    )
    return len(encoded).to_bytes(4, "big") + encoded
