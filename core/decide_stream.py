"""A caller's DecideStream: orders decided one by one on one long-lived stream.

``DecideStreamClient.decide`` sends an order as a message with its timeout and returns the
answer with its request id; an error response raises ``MessageError``, an ``AioRpcError``
with the status a unary Decide would have ended with, so a caller handles both alike.

Who retries what (docs/overload.md): the server never resends. When a stream ends (the
server stopping, the connection's maximum age, a broken connection), the client opens a
new one and resends each message left unanswered, once, if its deadline has not passed;
an answered message is never resent. A resent message may be decided twice (a request id
is not an idempotency key), as a unary call retried after its answer was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from proto.decision.v1 import decision_pb2, decision_pb2_grpc

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class MessageError(grpc.aio.AioRpcError):
    """A message's error response, or its stream's end with the message unanswered."""

    def __init__(self, code: grpc.StatusCode, details: str, *, retry_delay_s: float = 0.0) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)
        self.retry_delay_s = retry_delay_s
        """RESOURCE_EXHAUSTED: when the server expects to take more."""

    @classmethod
    def of(cls, error: decision_pb2.DecideStreamError) -> MessageError:
        code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
        return cls(code, error.message, retry_delay_s=error.retry_delay.ToNanoseconds() / 1e9)


@dataclass(slots=True)
class _Waiting:
    message: decision_pb2.DecideStreamRequest
    answer: asyncio.Future[decision_pb2.DecideResponse]
    deadline: float  # the event loop's clock
    resent: bool = field(default=False)


class DecideStreamClient:
    """One DecideStream on ``channel``, opened at the first ``decide`` and again after it
    ends; ``close`` half-closes it once the answers are in."""

    def __init__(
        self, channel: grpc.aio.Channel, *, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._stub = decision_pb2_grpc.DecisionServiceStub(channel)
        self._metadata = metadata
        self._waiting: dict[str, _Waiting] = {}
        self._outbox: asyncio.Queue[decision_pb2.DecideStreamRequest | None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.streams_opened = 0

    async def decide(
        self, request: decision_pb2.DecideRequest, timeout_s: float
    ) -> decision_pb2.DecideResponse:
        """The order's answer within ``timeout_s``; ``request.request_id`` is required and
        must not be waiting already."""
        if not request.request_id or request.request_id in self._waiting:
            raise ValueError("a stream's request needs a request_id not already waiting")
        loop = asyncio.get_running_loop()
        message = decision_pb2.DecideStreamRequest(request=request)
        message.timeout.FromMicroseconds(round(timeout_s * 1e6))
        waiting = _Waiting(message, loop.create_future(), loop.time() + timeout_s)
        self._waiting[request.request_id] = waiting
        try:
            self._send(message)
            async with asyncio.timeout(timeout_s):
                return await waiting.answer
        except TimeoutError:
            raise MessageError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time") from None
        finally:
            self._waiting.pop(request.request_id, None)

    def _send(self, message: decision_pb2.DecideStreamRequest) -> None:
        if self._outbox is None:
            self._outbox = asyncio.Queue()
            call = self._stub.DecideStream(_drain(self._outbox), metadata=self._metadata)
            self._reader = asyncio.create_task(self._read(call, self._outbox))
            self.streams_opened += 1
        self._outbox.put_nowait(message)

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall[
            decision_pb2.DecideStreamRequest, decision_pb2.DecideStreamResponse
        ],
        outbox: asyncio.Queue[decision_pb2.DecideStreamRequest | None],
    ) -> None:
        ended: grpc.aio.AioRpcError | None = None
        try:
            async for response in call:
                waiting = self._waiting.get(response.request_id)
                if waiting is None or waiting.answer.done():
                    continue  # its caller has given up
                if response.HasField("error"):
                    waiting.answer.set_exception(MessageError.of(response.error))
                else:
                    waiting.answer.set_result(response.response)
        except grpc.aio.AioRpcError as exc:
            ended = exc
        finally:
            if self._outbox is outbox:
                self._outbox = None
        self._resend(ended)

    def _resend(self, ended: grpc.aio.AioRpcError | None) -> None:
        """The stream ended with messages unanswered: each resent once on a new stream
        while its deadline allows, else failed with the stream's status."""
        now = asyncio.get_running_loop().time()
        for waiting in list(self._waiting.values()):
            if waiting.answer.done():
                continue
            if not waiting.resent and waiting.deadline > now:
                waiting.resent = True
                self._send(waiting.message)
            else:
                code = ended.code() if ended is not None else grpc.StatusCode.UNAVAILABLE
                details = ended.details() if ended is not None else "the stream ended"
                waiting.answer.set_exception(MessageError(code, details or ""))

    async def close(self) -> None:
        """Half-closes the stream; the answers still due arrive, then it ends."""
        outbox, reader = self._outbox, self._reader
        self._outbox = self._reader = None
        if outbox is not None:
            outbox.put_nowait(None)
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _drain(
    outbox: asyncio.Queue[decision_pb2.DecideStreamRequest | None],
) -> AsyncIterator[decision_pb2.DecideStreamRequest]:
    while (message := await outbox.get()) is not None:
        yield message
