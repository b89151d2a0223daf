"""The errors a client can see (README.md#calling-it), each carrying its gRPC status code,
turned into a status in one place, ``grpc_errors``::

    DecisionError                INTERNAL (as is any other error, logged)
    ├── InvalidArgument          INVALID_ARGUMENT (names every bad field)
    ├── Expired                  DEADLINE_EXCEEDED (the deadline passed while queued)
    ├── Overloaded               RESOURCE_EXHAUSTED (refused before any work, with RetryInfo)
    ├── FailedPrecondition       FAILED_PRECONDITION (the deployment cannot do it)
    └── AuditUnavailable, StoreUnavailable, FleetUnavailable, SharedStateUnavailable:
                                 UNAVAILABLE (the journal or a store did not answer)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self_ = TypeVar("Self_")


class DecisionError(Exception):
    code = grpc.StatusCode.INTERNAL

    def details(self) -> list[Message]:
        """``google.rpc`` error details sent beside the status (none by default)."""
        return []


# Violations listed in one INVALID_ARGUMENT (its message and its BadRequest).
MAX_VIOLATIONS = 20


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: ``field`` as a path (``requests[3].quantity``)."""

    field: str
    problem: str


class InvalidArgument(DecisionError):
    """Every bad field of a request, each also sent as a ``google.rpc.BadRequest`` field
    violation in the status details; the message names them all."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        self.violations: tuple[FieldViolation, ...] = (FieldViolation(field, problem),)
        super().__init__(f"{field}: {problem}")

    @classmethod
    def of(cls, violations: Sequence[FieldViolation]) -> InvalidArgument:
        """One error for several violations (at least one); past ``MAX_VIOLATIONS`` the
        rest are counted, not listed: a status goes back in trailing metadata, which gRPC
        bounds (8 KiB by default), and a batch of 256 bad requests must still get its
        INVALID_ARGUMENT."""
        error = cls(violations[0].field, violations[0].problem)
        error.violations = tuple(violations[:MAX_VIOLATIONS])
        text = "; ".join(f"{v.field}: {v.problem[:200]}" for v in error.violations)
        if len(violations) > MAX_VIOLATIONS:
            text += f"; and {len(violations) - MAX_VIOLATIONS} more"
        error.args = (text,)
        return error

    @property
    def field(self) -> str:
        return self.violations[0].field

    def details(self) -> list[Message]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.problem
                    )
                    for v in self.violations
                ]
            )
        ]


class AuditUnavailable(DecisionError):
    """The journal refused the decision's record: no decision is returned unrecorded."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, problem: str) -> None:
        super().__init__(f"decision not recorded, so not returned: {problem}")


class Expired(DecisionError):
    """The call's deadline had passed when its handler ran: it waited in the server's
    queue too long. No decision is made (nor recorded): nobody waits for it."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self) -> None:
        super().__init__("deadline passed before the server took the call up: no decision made")


class Overloaded(DecisionError):
    """The calls the server is serving would outlast this one's budget: refused at once,
    before any work (nothing decided, nothing recorded), so that the caller can go to
    another server or decide without us. ``RetryInfo`` says when this server expects to
    have worked them off."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, backlog_ms: float) -> None:
        self.backlog_ms = backlog_ms
        super().__init__(f"server busy for ~{backlog_ms:.0f} ms: refused before any work")

    def details(self) -> list[Message]:
        delay = Duration()
        delay.FromMicroseconds(round(self.backlog_ms * 1000))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class StoreUnavailable(DecisionError):
    """The audit store did not answer a read (the journal keeps every record meanwhile)."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, problem: str) -> None:
        super().__init__(f"audit store unavailable: {problem}")


class FleetUnavailable(DecisionError):
    """The shared store holding the fleet list did not answer."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, problem: str) -> None:
        super().__init__(f"fleet list unavailable: {problem}")


class SharedStateUnavailable(DecisionError):
    """The durable store did not take an admin change."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, problem: str) -> None:
        super().__init__(f"shared state unavailable, change not confirmed: {problem}")


class FailedPrecondition(DecisionError):
    """The deployment cannot do what was asked (a promotion no canary has earned, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UndecodableRequest:
    """Stands in for a request whose bytes are not the expected message.

    grpc answers INTERNAL when a deserializer raises; bad input must get
    INVALID_ARGUMENT, so decoding never raises and ``grpc_errors`` rejects this instead.
    """

    def __init__(self, message_name: str) -> None:
        self.message_name = message_name


def tolerant_parser(message: type[M]) -> Callable[[bytes], M | UndecodableRequest]:
    def parse(data: bytes) -> M | UndecodableRequest:
        try:
            return message.FromString(data)
        except DecodeError:
            return UndecodableRequest(message.DESCRIPTOR.full_name)

    return parse


Handler = Callable[[Self_, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


# The only place a call's unexpected error is caught. The other bare ``except Exception``
# clauses sit at the boundary of a background loop, thread or task that must outlive a
# surprise (the shipper, the control listener, the consumer, shadow calls, the canary's
# check, the breaker's bookkeeping); each says why. Model-call failures
# (``server.model_errors``) never get here: the engine turns them into a fallback step.
def grpc_errors(handler: Handler[Self_, Req, Resp]) -> Handler[Self_, Req, Resp]:
    """Turns a ``DecisionError`` into its status, anything else into INTERNAL (logged)."""

    @functools.wraps(handler)
    async def wrapper(
        self: Self_, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidArgument("request", f"not a valid {request.message_name}")
            return await handler(self, request, context)
        except DecisionError as exc:
            code, details, extra = exc.code, str(exc), exc.details()
        except Exception:
            log.exception("unhandled error in %s", handler.__qualname__)
            code, details, extra = grpc.StatusCode.INTERNAL, "internal error; see server logs", []
        trailing = _with_status(context, code, details, extra) if extra else ()
        await context.abort(code, details, trailing)
        raise AssertionError("context.abort returned")  # pragma: no cover - abort raises

    return wrapper


def _with_status(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    details: Sequence[Message],
) -> tuple[tuple[str, str | bytes], ...]:
    """The call's trailing metadata so far (the traceparent) and the ``google.rpc.Status``
    with ``details``, where grpcio-status's ``rpc_status.from_call`` finds it."""
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    rich = rpc_status.to_status(status)
    return (*tuple(context.trailing_metadata() or ()), *rich.trailing_metadata)
