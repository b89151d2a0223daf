"""DecideStream: each message of a stream decided as a unary Decide would be.

A message is a call (docs/overload.md): its own id and deadline, one response with its id
(an answer, or the status a unary call would have ended with, as a ``DecideStreamError``),
the same checks before any work. What a stream must not escape: its unanswered messages
are capped at what one connection may have in flight as calls, and each message meets the
process's backlog check; a message past either is refused at once in its own response.
Messages are decided concurrently and answered as they are ready, one write at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from core.deadline import Budget
from core.domain import CallInfo
from decision_client.v1 import decision_pb2
from server.admission import Admission, Caller, caller_of
from server.engine import DecisionEngine
from server.errors import (
    DecisionError,
    InvalidArgument,
    Overloaded,
    UndecodableRequest,
)
from server.load_metrics import StreamCalls
from server.validation import order_from_pb, response_to_pb

log = logging.getLogger(__name__)

# After the caller half-closes, the answers still due are written within this; a caller
# that stopped reading is cut (each message's own budget is far shorter).
DRAIN_S = 10.0

Context = grpc.aio.ServicerContext[
    decision_pb2.DecideStreamRequest, decision_pb2.DecideStreamResponse
]
MessageObserver = Callable[[grpc.StatusCode, float], None]
"""Told each message's status and seconds from receipt to its response (request metrics)."""


def error_pb(error: DecisionError) -> decision_pb2.DecideStreamError:
    """The status a unary call would have ended with, as a message's response."""
    pb = decision_pb2.DecideStreamError(code=error.code.value[0], message=str(error))
    if isinstance(error, Overloaded):
        pb.retry_delay.FromMicroseconds(round(error.backlog_ms * 1000))
    if isinstance(error, InvalidArgument):
        pb.field_violations.extend(
            decision_pb2.FieldViolation(field=v.field, description=v.problem)
            for v in error.violations
        )
    return pb


class _Unanswered(Overloaded):
    """The connection's streams already hold as many unanswered messages as it may hold
    calls: refused at once, like the call past a connection's stream cap."""

    def __init__(self, limit: int, backlog_ms: float) -> None:
        super().__init__(backlog_ms)
        self.args = (f"{limit} messages unanswered on this connection: refused before any work",)


class Connection:
    """What one connection's DecideStreams hold: the cap counts their unanswered messages
    together, so that more streams on a connection do not raise it."""

    __slots__ = ("streams", "unanswered")

    def __init__(self) -> None:
        self.streams = self.unanswered = 0


class DecisionStream:
    """One DecideStream call, from its first message to its end."""

    def __init__(
        self,
        engine: DecisionEngine,
        admission: Admission,
        counts: StreamCalls,
        observe: MessageObserver | None,
        context: Context,
        call: CallInfo,
        connection: Connection,
        max_unanswered: int,
    ) -> None:
        """``max_unanswered``: over the streams of ``connection``."""
        self._engine, self._admission = engine, admission
        self._counts, self._observe = counts, observe
        self._context, self._call = context, call
        self._connection, self._max_unanswered = connection, max_unanswered
        self._unanswered: dict[str, asyncio.Task[None]] = {}
        self._refusing: set[asyncio.Task[None]] = set()  # error answers being written
        self._writing = asyncio.Lock()

    async def serve(self, requests: AsyncIterator[Any]) -> None:
        """Reads every message as it arrives; after the caller half-closes, answers those
        left (a caller that stops reading is cut after ``DRAIN_S``)."""
        try:
            async for message in requests:
                self._take(message, time.perf_counter())
            if pending := [*self._unanswered.values(), *self._refusing]:
                await asyncio.wait(pending, timeout=DRAIN_S)
        finally:
            for task in [*self._unanswered.values(), *self._refusing]:
                task.cancel()

    def _take(self, message: Any, begun: float) -> None:
        """Starts the message's decision, or its error answer: either in a task of its
        own, so that the next message is read at once."""
        self._counts.messages += 1
        request_id = ""
        try:
            if isinstance(message, UndecodableRequest):
                raise InvalidArgument("request", f"not a valid {message.message_name}")
            request_id = message.request.request_id
            if not request_id:
                raise InvalidArgument("request.request_id", "is required on a stream")
            if request_id in self._unanswered:
                raise InvalidArgument("request.request_id", "is already unanswered on this stream")
            order = order_from_pb(message.request, "request.")
            if (held := self._connection.unanswered) >= self._max_unanswered:
                raise _Unanswered(self._max_unanswered, held * self._admission.cost.ms)
            caller = caller_of(self._call, [order])
            budget = self._budget(message, caller)
        except Exception as exc:  # as a unary call's error: this message's, not the stream's
            if not isinstance(exc, DecisionError):
                log.exception("unhandled error taking a DecideStream message")
            error = exc if isinstance(exc, DecisionError) else _Internal()
            task = asyncio.create_task(self._answer_error(request_id, error, begun))
            self._refusing.add(task)
            task.add_done_callback(self._refusing.discard)
            return
        call = dataclasses.replace(self._call, received_at_ns=time.time_ns())
        self._connection.unanswered += 1
        task = asyncio.create_task(self._decide(request_id, order, budget, call, begun))
        self._unanswered[request_id] = task
        task.add_done_callback(functools.partial(self._settled, request_id, caller))

    def _settled(self, request_id: str, caller: Caller, task: asyncio.Task[None]) -> None:
        """A message's task is done, also one cancelled before it ran: its place on the
        connection and in its caller's share are free."""
        if self._unanswered.get(request_id) is task:
            del self._unanswered[request_id]
        self._connection.unanswered -= 1
        self._admission.finished(caller)

    def _budget(self, message: decision_pb2.DecideStreamRequest, caller: Caller) -> Budget:
        """The message's budget from its own timeout (unset: the default), within the
        stream's deadline; refused as a unary call would be."""
        remaining_s = self._context.time_remaining()
        own_s = message.timeout.ToNanoseconds() / 1e9 if message.HasField("timeout") else 0.0
        if own_s < 0:
            raise InvalidArgument("timeout", f"must not be negative, got {own_s:g} s")
        if own_s > 0:
            remaining_s = own_s if remaining_s is None else min(own_s, remaining_s)
        return self._admission.admit(remaining_s, caller, within_default=own_s <= 0)

    async def _decide(
        self,
        request_id: str,
        order: Any,
        budget: Budget,
        call: CallInfo,
        begun: float,
    ) -> None:
        try:
            (result,) = await self._engine.decide([order], budget, call)
        except DecisionError as exc:
            await self._answer_error(request_id, exc, begun)
        except asyncio.CancelledError:  # the stream ended: this message ends unanswered
            self._ended(grpc.StatusCode.CANCELLED, begun)
            raise
        except Exception:
            log.exception("unhandled error deciding a DecideStream message")
            await self._answer_error(request_id, _Internal(), begun)
        else:
            response = decision_pb2.DecideStreamResponse(
                request_id=request_id, response=response_to_pb(result)
            )
            await self._write(response, grpc.StatusCode.OK, begun)
        finally:  # the id is free for a new message once answered (``_settled`` comes later)
            self._unanswered.pop(request_id, None)

    async def _answer_error(self, request_id: str, error: DecisionError, begun: float) -> None:
        response = decision_pb2.DecideStreamResponse(request_id=request_id, error=error_pb(error))
        await self._write(response, error.code, begun)

    async def _write(
        self, response: decision_pb2.DecideStreamResponse, code: grpc.StatusCode, begun: float
    ) -> None:
        """Answers one message; one that cannot be written (the stream ended) ends as
        CANCELLED, as a unary call whose caller went away."""
        try:
            async with self._writing:  # gRPC's core takes one message at a time
                await self._context.write(response)
        except grpc.aio.BaseError as exc:  # the caller resends what it lacks
            log.debug("a DecideStream response not written: %r", exc)
            code = grpc.StatusCode.CANCELLED
        except asyncio.CancelledError:
            self._ended(grpc.StatusCode.CANCELLED, begun)
            raise
        self._ended(code, begun)

    def _ended(self, code: grpc.StatusCode, begun: float) -> None:
        """A message's end: answered OK, or failed with ``code`` (a refusal too, as a
        unary call the handler refused), counted and measured once."""
        if code is grpc.StatusCode.OK:
            self._counts.answered += 1
        else:
            self._counts.failed += 1
        if self._observe is not None:
            self._observe(code, time.perf_counter() - begun)


class _Internal(DecisionError):
    def __init__(self) -> None:
        super().__init__("internal error; see server logs")
