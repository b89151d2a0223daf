"""From a request frame to a response frame: header, version check, decode, handler, encode.

A request the broker can read always gets an answer in its own response schema, the error
on everything it named (``protocol.error_body``): UNSUPPORTED_VERSION for an API or version
not served, UNKNOWN_SERVER_ERROR for a handler that fails, each kind logged once per API
and version. A frame that cannot be read raises ``MalformedRequestError`` and its
connection is closed, as Kafka does; so does a failed acks=0 Produce, which has no response
to carry the error. The client's view: docs/kafka-apis.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from io import BytesIO

from localkafka.errors import ErrorCode, MalformedRequestError
from localkafka.protocol import (
    KNOWN,
    SUPPORTED,
    ApiKey,
    Body,
    Handler,
    RequestContext,
    advertised_versions,
    decode_body,
    decode_header,
    encode_response,
    error_body,
)

log = logging.getLogger(__name__)

_SERVED_KEYS = frozenset(int(key) for key in ApiKey)


class Dispatcher:
    def __init__(self, routes: Mapping[ApiKey, Handler]) -> None:
        self._routes = {**routes, ApiKey.API_VERSIONS: self._api_versions}
        missing = set(SUPPORTED) - set(self._routes)
        if missing:
            raise ValueError(f"no handler for {sorted(k.name for k in missing)}")
        self._logged: set[tuple[str, int, int]] = set()

    async def handle(self, frame: bytes, client_host: str) -> bytes | None:
        """The response frame (size-prefixed) to a request frame, or None for no response."""
        buffer = BytesIO(frame)
        header = decode_header(buffer)
        key, version = header.api_key, header.api_version
        api_versions = SUPPORTED[ApiKey.API_VERSIONS]
        if key == ApiKey.API_VERSIONS and version not in api_versions:
            # KIP-511: Kafka's v0 answer with the range served, so the client retries in it.
            own = [e for e in advertised_versions() if e["api_key"] == ApiKey.API_VERSIONS]
            body = {"error_code": ErrorCode.UNSUPPORTED_VERSION, "api_versions": own}
            return encode_response(api_versions[0][1], header.correlation_id, body)
        api = ApiKey(key) if key in _SERVED_KEYS else None
        structs = SUPPORTED[api].get(version) if api is not None else None
        if api is None or structs is None:
            known = KNOWN.get((key, version))
            if known is None:
                raise MalformedRequestError(f"API key {key} v{version} is unknown")
            request = decode_body(known[0], buffer, len(frame))
            if key == ApiKey.PRODUCE and request.get("required_acks") == 0:
                raise MalformedRequestError(f"acks=0 Produce v{version} is not served")
            if self._first_time("unserved", key, version):
                log.warning("%s is not served: answered UNSUPPORTED_VERSION", known[0].__name__)
            body = error_body(known[1].SCHEMA, ErrorCode.UNSUPPORTED_VERSION, request)
            return encode_response(known[1], header.correlation_id, body)
        request = decode_body(structs[0], buffer, len(frame))
        log.debug("%s v%d from %s", api.name, version, header.client_id)
        context = RequestContext(api, version, header.correlation_id, header.client_id, client_host)
        try:
            response = await self._routes[api](context, request)
        except MalformedRequestError:
            raise
        except Exception:  # one request's failure is answered, never the connection's end
            if self._first_time("failed", key, version):
                log.exception("%s v%d failed: answered UNKNOWN_SERVER_ERROR", api.name, version)
            if api == ApiKey.PRODUCE and request.get("required_acks") == 0:
                raise MalformedRequestError("acks=0 Produce failed") from None
            response = error_body(structs[1].SCHEMA, ErrorCode.UNKNOWN_SERVER_ERROR, request)
        if response is None:
            return None
        return encode_response(structs[1], header.correlation_id, response)

    def _first_time(self, kind: str, key: int, version: int) -> bool:
        """Whether this kind of answer to this API and version is to be logged: the first."""
        seen = (kind, key, version) in self._logged
        self._logged.add((kind, key, version))
        return not seen

    async def _api_versions(self, context: RequestContext, request: Body) -> Body:
        return {"error_code": 0, "api_versions": advertised_versions(), "throttle_time_ms": 0}
