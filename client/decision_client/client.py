"""Callers' helpers: a channel opened the recommended way and typed calls on it.

``connect`` (blocking) and ``connect_async`` (asyncio) open a channel with
``channel_options()`` (a refusal fails at once rather than queueing; the service config)
and return a client whose ``decide`` and ``decide_batch`` take a deadline on every call:
a trading caller that waits without one waits past the moment its order mattered.
``AsyncDecisionClient.stream()`` is a DecideStream for orders that arrive one by one.

W3C trace context is passed through: a ``traceparent`` (and ``tracestate``) given to a
call goes as its metadata, and the decision server's spans join the caller's trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from types import TracebackType

import grpc

from decision_client.channel import channel_options
from decision_client.stream import DecideStreamClient
from decision_client.v1 import decision_pb2, decision_pb2_grpc

Metadata = tuple[tuple[str, str], ...]


def call_metadata(
    traceparent: str | None, tracestate: str | None, metadata: Iterable[tuple[str, str]]
) -> Metadata:
    """A call's metadata: the caller's own, with the trace context when given."""
    trace = (("traceparent", traceparent),) if traceparent else ()
    state = (("tracestate", tracestate),) if traceparent and tracestate else ()
    return (*trace, *state, *metadata)


def connect(target: str, *, credentials: grpc.ChannelCredentials | None = None) -> DecisionClient:
    """A blocking client on a new channel to ``target`` (``host:port``, ``dns:///name``);
    TLS with ``credentials``, else plaintext."""
    options = channel_options()
    if credentials is None:
        return DecisionClient(grpc.insecure_channel(target, options=options))
    return DecisionClient(grpc.secure_channel(target, credentials, options=options))


def connect_async(
    target: str, *, credentials: grpc.ChannelCredentials | None = None
) -> AsyncDecisionClient:
    """An asyncio client on a new channel to ``target``; call it within a running loop."""
    options = channel_options()
    if credentials is None:
        return AsyncDecisionClient(grpc.aio.insecure_channel(target, options=options))
    return AsyncDecisionClient(grpc.aio.secure_channel(target, credentials, options=options))


class DecisionClient:
    """Blocking calls on ``channel``; closing the client closes the channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = decision_pb2_grpc.DecisionServiceStub(channel)

    def wait_ready(self, timeout_s: float) -> None:
        """Connects (``grpc.FutureTimeoutError`` past ``timeout_s``): the first call's
        deadline is then not spent on the connection's set-up."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def decide(
        self,
        request: decision_pb2.DecideRequest,
        *,
        timeout_s: float,
        traceparent: str | None = None,
        tracestate: str | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> decision_pb2.DecideResponse:
        """One order's answer within ``timeout_s``, else ``grpc.RpcError``."""
        return self.stub.Decide(
            request, timeout=timeout_s, metadata=call_metadata(traceparent, tracestate, metadata)
        )

    def decide_batch(
        self,
        requests: Sequence[decision_pb2.DecideRequest],
        *,
        timeout_s: float,
        traceparent: str | None = None,
        tracestate: str | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> list[decision_pb2.DecideResponse]:
        """Each order's answer, in order, within ``timeout_s`` for them all."""
        batch = self.stub.DecideBatch(
            decision_pb2.DecideBatchRequest(requests=requests),
            timeout=timeout_s,
            metadata=call_metadata(traceparent, tracestate, metadata),
        )
        return list(batch.responses)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DecisionClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncDecisionClient:
    """asyncio calls on ``channel``; closing the client closes the channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = decision_pb2_grpc.DecisionServiceStub(channel)

    async def wait_ready(self, timeout_s: float) -> None:
        """Connects (``TimeoutError`` past ``timeout_s``): the first call's deadline is
        then not spent on the connection's set-up."""
        async with asyncio.timeout(timeout_s):
            await self.channel.channel_ready()

    async def decide(
        self,
        request: decision_pb2.DecideRequest,
        *,
        timeout_s: float,
        traceparent: str | None = None,
        tracestate: str | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> decision_pb2.DecideResponse:
        """One order's answer within ``timeout_s``, else ``grpc.aio.AioRpcError``."""
        return await self.stub.Decide(
            request, timeout=timeout_s, metadata=call_metadata(traceparent, tracestate, metadata)
        )

    async def decide_batch(
        self,
        requests: Sequence[decision_pb2.DecideRequest],
        *,
        timeout_s: float,
        traceparent: str | None = None,
        tracestate: str | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> list[decision_pb2.DecideResponse]:
        """Each order's answer, in order, within ``timeout_s`` for them all."""
        batch = await self.stub.DecideBatch(
            decision_pb2.DecideBatchRequest(requests=requests),
            timeout=timeout_s,
            metadata=call_metadata(traceparent, tracestate, metadata),
        )
        return list(batch.responses)

    def stream(
        self,
        *,
        traceparent: str | None = None,
        tracestate: str | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> DecideStreamClient:
        """A DecideStream on this channel (``DecideStreamClient``: each order its own id
        and timeout); close it before the client."""
        return DecideStreamClient(
            self.channel, metadata=call_metadata(traceparent, tracestate, metadata)
        )

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncDecisionClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
