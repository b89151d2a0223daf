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
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from decision_client.v1 import decision_pb2, decision_pb2_grpc

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
# ``close`` waits this long for the answers still due (a connection that died silently
# would otherwise hold it forever).
CLOSE_WAIT_S = 5.0


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
    outbox: Outbox | None = None  # the stream it was last sent on
    resent: bool = field(default=False)


Outbox = asyncio.Queue[decision_pb2.DecideStreamRequest | None]


class DecideStreamClient:
    """One DecideStream on ``channel``, opened at the first ``decide`` and again after it
    ends; ``close`` half-closes it once the answers are in.

    A request id stays taken until the server has answered it or its stream has ended,
    even after ``decide`` gave up waiting: the server may still be deciding it, and its
    late answer must not reach a new order with the same id.
    """

    def __init__(
        self, channel: grpc.aio.Channel, *, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._stub = decision_pb2_grpc.DecisionServiceStub(channel)
        self._metadata = metadata
        self._waiting: dict[str, _Waiting] = {}
        self._outbox: Outbox | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._closing = False
        self.streams_opened = 0

    async def decide(
        self, request: decision_pb2.DecideRequest, timeout_s: float
    ) -> decision_pb2.DecideResponse:
        """The order's answer within ``timeout_s``; ``request.request_id`` is required and
        must not be taken (see the class)."""
        if not request.request_id or request.request_id in self._waiting:
            raise ValueError("a stream's request needs a request_id not taken on the stream")
        loop = asyncio.get_running_loop()
        self._closing = False
        message = decision_pb2.DecideStreamRequest(request=request)
        message.timeout.FromMicroseconds(round(timeout_s * 1e6))
        waiting = _Waiting(message, loop.create_future(), loop.time() + timeout_s)
        self._waiting[request.request_id] = waiting
        self._send(waiting)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiting.answer
        except TimeoutError:
            raise MessageError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time") from None

    def _send(self, waiting: _Waiting) -> None:
        if self._outbox is None:
            self._outbox = Outbox()
            call = self._stub.DecideStream(_drain(self._outbox), metadata=self._metadata)
            reader = asyncio.create_task(self._read(call, self._outbox))
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
            self.streams_opened += 1
        waiting.outbox = self._outbox
        self._outbox.put_nowait(waiting.message)

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall[
            decision_pb2.DecideStreamRequest, decision_pb2.DecideStreamResponse
        ],
        outbox: Outbox,
    ) -> None:
        ended: grpc.aio.AioRpcError | None = None
        try:
            async for response in call:
                waiting = self._waiting.pop(response.request_id, None)
                if waiting is None or waiting.answer.done():
                    continue  # its caller has given up
                if response.HasField("error"):
                    waiting.answer.set_exception(MessageError.of(response.error))
                else:
                    waiting.answer.set_result(response.response)
        except grpc.aio.AioRpcError as exc:
            ended = exc
        finally:  # also when ``close`` cancels this reader: its messages fail then
            call.cancel()  # a no-op once the stream has ended
            outbox.put_nowait(None)  # ends the request iterator's task
            if self._outbox is outbox:
                self._outbox = None
            self._resend(outbox, ended)

    def _resend(self, outbox: Outbox, ended: grpc.aio.AioRpcError | None) -> None:
        """The stream on ``outbox`` ended with messages unanswered: each resent once on a
        new stream with what is left of its timeout, else failed with the stream's
        status (and its request id freed)."""
        now = asyncio.get_running_loop().time()
        for request_id, waiting in list(self._waiting.items()):
            if waiting.outbox is not outbox:
                continue  # sent on another stream
            left_s = waiting.deadline - now
            if waiting.answer.done() or waiting.resent or left_s <= 0 or self._closing:
                del self._waiting[request_id]
                if not waiting.answer.done():
                    code = ended.code() if ended is not None else grpc.StatusCode.UNAVAILABLE
                    details = ended.details() if ended is not None else "the stream ended"
                    waiting.answer.set_exception(MessageError(code, details or ""))
                continue
            waiting.resent = True
            waiting.message.timeout.FromMicroseconds(round(left_s * 1e6))
            try:
                self._send(waiting)
            except grpc.aio.UsageError as exc:  # the channel was closed meanwhile
                del self._waiting[request_id]
                waiting.answer.set_exception(MessageError(grpc.StatusCode.UNAVAILABLE, str(exc)))

    async def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Half-closes the stream: the answers still due arrive, then it ends; what is not
        answered within ``timeout_s`` is cancelled. Nothing is resent after this."""
        self._closing = True
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.put_nowait(None)
        readers = list(self._readers)
        if readers:
            _, late = await asyncio.wait(readers, timeout=timeout_s)
            for reader in late:
                reader.cancel()
            await asyncio.gather(*late, return_exceptions=True)


async def _drain(outbox: Outbox) -> AsyncIterator[decision_pb2.DecideStreamRequest]:
    while (message := await outbox.get()) is not None:
        yield message
