"""From a request frame to a response frame: header, version check, decode, handler, encode.

An unknown API key, an unserved version or undecodable bytes raise
``MalformedRequestError``: the connection is closed, as Kafka does. The exception is
ApiVersions in a version we do not serve, answered (as Kafka does, KIP-511) in v0 with
UNSUPPORTED_VERSION and the ApiVersions range we serve, so the client can retry.
"""

from __future__ import annotations

from collections.abc import Mapping
from io import BytesIO

from localkafka.errors import ErrorCode, MalformedRequestError
from localkafka.protocol import (
    SUPPORTED,
    ApiKey,
    Body,
    Handler,
    RequestContext,
    advertised_versions,
    decode_body,
    decode_header,
    encode_response,
)


class Dispatcher:
    def __init__(self, routes: Mapping[ApiKey, Handler]) -> None:
        self._routes = {**routes, ApiKey.API_VERSIONS: self._api_versions}
        missing = set(SUPPORTED) - set(self._routes)
        if missing:
            raise ValueError(f"no handler for {sorted(k.name for k in missing)}")

    async def handle(self, frame: bytes, client_host: str) -> bytes | None:
        """The response frame (size-prefixed) to a request frame, or None for no response."""
        buffer = BytesIO(frame)
        header = decode_header(buffer)
        api_versions = SUPPORTED[ApiKey.API_VERSIONS]
        if header.api_key == ApiKey.API_VERSIONS and header.api_version not in api_versions:
            own = [e for e in advertised_versions() if e["api_key"] == ApiKey.API_VERSIONS]
            body = {"error_code": ErrorCode.UNSUPPORTED_VERSION, "api_versions": own}
            return encode_response(api_versions[0][1], header.correlation_id, body)
        try:
            key = ApiKey(header.api_key)
        except ValueError:
            raise MalformedRequestError(f"unknown API key {header.api_key}") from None
        structs = SUPPORTED[key].get(header.api_version)
        if structs is None:
            raise MalformedRequestError(f"{key.name} v{header.api_version} is not served")
        request = decode_body(structs[0], buffer, len(frame))
        context = RequestContext(
            key, header.api_version, header.correlation_id, header.client_id, client_host
        )
        response = await self._routes[key](context, request)
        if response is None:
            return None
        return encode_response(structs[1], header.correlation_id, response)

    async def _api_versions(self, context: RequestContext, request: Body) -> Body:
        return {"error_code": 0, "api_versions": advertised_versions(), "throttle_time_ms": 0}
