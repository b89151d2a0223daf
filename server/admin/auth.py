"""Bearer-token authentication and roles for AdminService.

Tokens come from ``DECISION_ADMIN__TOKENS``, one entry per line or per ``,``:
``<principal> <role> <token>``, ``#`` starts a comment. Only the tokens'
sha256 digests are kept, and a presented token is compared with every known digest in
constant time, so neither timing nor a memory dump reveals a token. Tokens never reach
a log: errors name the principal or the line, never the token.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpc

BEARER = "bearer "


class Role(enum.IntEnum):
    """Ordered: a role may do what every lower role may."""

    VIEWER = 1
    OPERATOR = 2


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role


class TokenError(ValueError):
    """A token entry that cannot be used; the message never contains the token."""


class TokenBook:
    def __init__(self, entries: Iterable[tuple[str, Role, str]]) -> None:
        self._digests: list[tuple[bytes, Principal]] = []
        seen: set[bytes] = set()
        for name, role, token in entries:
            digest = hashlib.sha256(token.encode()).digest()
            if digest in seen:
                raise TokenError(f"the token of {name!r} is given twice")
            seen.add(digest)
            self._digests.append((digest, Principal(name, role)))

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def parse(cls, text: str, *, origin: str) -> list[tuple[str, Role, str]]:
        entries = []
        for number, raw in enumerate(text.replace(",", "\n").splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3:
                raise TokenError(f"{origin} entry {number}: expected '<principal> <role> <token>'")
            name, role_name, token = parts
            try:
                role = Role[role_name.upper()]
            except KeyError:
                raise TokenError(
                    f"{origin} entry {number} ({name}): role must be viewer or operator"
                ) from None
            if len(token) < 16:
                raise TokenError(f"{origin} entry {number} ({name}): token shorter than 16")
            entries.append((name, role, token))
        return entries

    @classmethod
    def load(cls, text: str) -> TokenBook:
        """The book of ``DECISION_ADMIN__TOKENS``."""
        return cls(cls.parse(text, origin="DECISION_ADMIN__TOKENS"))

    def authenticate(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, principal in self._digests:  # no early exit: constant time
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            if value[: len(BEARER)].lower() == BEARER:
                return value[len(BEARER) :].strip()
            return None
    return None


Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehaviour = Callable[
    [AsyncIterator[Any], grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]
]


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits a call when its bearer token maps to a role at least the method's.

    ``required`` maps full method names (``/decision.v1.AdminService/SetFlag``) to
    roles; a method not listed needs ``default_role``. The servicer reads the admitted
    principal with ``current_principal()``.
    """

    def __init__(
        self, tokens: TokenBook, required: Mapping[str, Role], *, default_role: Role
    ) -> None:
        self._tokens = tokens
        self._required = dict(required)
        self._default = default_role

    async def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """The call's principal, or the call aborted with UNAUTHENTICATED or
        PERMISSION_DENIED."""
        needed = self._required.get(method, self._default)
        token = bearer_token(context.invocation_metadata())
        if token is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token: send metadata 'authorization: Bearer <token>'",
            )
        principal = self._tokens.authenticate(token or "")
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
            raise AssertionError("context.abort returned")  # pragma: no cover
        if principal.role < needed:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.name} ({principal.role.name.lower()}) may not call"
                f" {method.rsplit('/', 1)[-1]}: it needs the {needed.name.lower()} role",
            )
        return principal

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        admit = self._admit
        if handler.unary_unary is not None:
            unary = cast(Behaviour, handler.unary_unary)

            async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                _principal.set(await admit(method, context))  # same context as the servicer
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                guarded,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:  # server reflection
            streaming = cast(StreamBehaviour, handler.stream_stream)

            async def guarded_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                _principal.set(await admit(method, context))
                async for response in streaming(requests, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                guarded_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # No other kind is served on the admin port: refuse rather than let it through.
        return grpc.unary_unary_rpc_method_handler(_unimplemented)


async def _unimplemented(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served on the admin port")


_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("admin_principal")


def current_principal() -> Principal:
    """The authenticated principal of the call being served (set by
    ``AdminAuthInterceptor`` around the servicer method)."""
    try:
        return _principal.get()
    except LookupError:
        raise RuntimeError("call not admitted by AdminAuthInterceptor") from None
