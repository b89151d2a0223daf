"""DecisionService over gRPC: converts protobuf to domain objects and back, nothing more."""

from __future__ import annotations

import string
import time
from collections.abc import AsyncIterator, Iterable
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry import trace

from core.deadline import CallCost, CallPlan
from core.domain import CallInfo, DecisionResult, OrderRequest
from decision_client.v1 import decision_pb2, decision_pb2_grpc
from server.admission import Admission, CallerShares, caller_of
from server.engine import DecisionEngine
from server.errors import grpc_errors, tolerant_parser
from server.load_metrics import StreamCalls
from server.streaming import Connection, DecisionStream, MessageObserver
from server.tracing import traceparent
from server.validation import order_from_pb, orders_from_batch_pb, response_to_pb

DECIDE_STREAM = "/decision.v1.DecisionService/DecideStream"


def trace_id_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The trace id of a W3C ``traceparent`` header (``00-<32 hex>-<16 hex>-<2 hex>``)."""
    for key, value in metadata or ():
        if key == "traceparent" and isinstance(value, str):
            parts = value.split("-")
            if len(parts) >= 4 and len(parts[1]) == 32 and _is_hex(parts[1]):
                return parts[1].lower()
    return ""


_HEX_DIGITS = frozenset(string.hexdigits)


def _is_hex(text: str) -> bool:
    return _HEX_DIGITS.issuperset(text)


def call_info(context: grpc.aio.ServicerContext[Any, Any]) -> CallInfo:
    """The call's trace id is its server span's when that is sampled (the caller's trace,
    or a new one), else the caller's ``traceparent``'s: an id with a trace behind it. The
    caller is its client certificate's identity (its first subject alternative name, else
    its common name, as gRPC reports it) when mTLS verified one, else the peer's address."""
    span = trace.get_current_span().get_span_context()
    sampled = span.is_valid and span.trace_flags.sampled
    identity = next(iter(context.peer_identities() or ()), None)
    return CallInfo(
        received_at_ns=time.time_ns(),
        trace_id=(
            f"{span.trace_id:032x}" if sampled else trace_id_of(context.invocation_metadata())
        ),
        caller=identity.decode(errors="replace") if identity else context.peer(),
        verified=identity is not None,
    )


def answer_traceparent(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Tells the caller the server span of its call (trailing ``traceparent``) when the
    call is sampled, so that a caller without tracing of its own can find the trace. Set
    first: an aborted call keeps it (``abort`` keeps the trailing metadata set before)."""
    value = traceparent(trace.get_current_span())
    if value is not None:
        context.set_trailing_metadata((("traceparent", value),))


class DecisionServicer(decision_pb2_grpc.DecisionServiceServicer):
    def __init__(
        self,
        engine: DecisionEngine,
        *,
        plan: CallPlan,
        stream_calls: StreamCalls | None = None,
        max_unanswered: int = 16,
        shares: CallerShares | None = None,
    ) -> None:
        """``max_unanswered``: the DecideStreams of one connection hold at most this many
        unanswered messages, what it may have calls in flight (``max_concurrent_streams``).
        ``shares``: each caller's share of the calls in flight (none: no limit)."""
        self._engine = engine
        self.call_cost = CallCost()
        self.admission = Admission(plan, engine, self.call_cost, shares or CallerShares(0, {}))
        self.stream_calls = stream_calls or StreamCalls()
        self._max_unanswered = max_unanswered
        self._connections: dict[str, Connection] = {}  # DecideStreams' connections, by peer
        self.observe_message: MessageObserver | None = None

    async def _decide(
        self, orders: list[OrderRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> list[DecisionResult]:
        call = call_info(context)
        caller = caller_of(call, orders)
        budget = self.admission.admit(context.time_remaining(), caller)
        try:
            return await self._engine.decide(orders, budget, call)
        finally:
            self.admission.finished(caller)

    @grpc_errors
    async def Decide(
        self,
        request: decision_pb2.DecideRequest,
        context: grpc.aio.ServicerContext[decision_pb2.DecideRequest, decision_pb2.DecideResponse],
    ) -> decision_pb2.DecideResponse:
        answer_traceparent(context)
        (result,) = await self._decide([order_from_pb(request)], context)
        return response_to_pb(result)

    @grpc_errors
    async def DecideBatch(
        self,
        request: decision_pb2.DecideBatchRequest,
        context: grpc.aio.ServicerContext[
            decision_pb2.DecideBatchRequest, decision_pb2.DecideBatchResponse
        ],
    ) -> decision_pb2.DecideBatchResponse:
        answer_traceparent(context)
        results = await self._decide(orders_from_batch_pb(request), context)
        return decision_pb2.DecideBatchResponse(responses=[response_to_pb(r) for r in results])

    async def DecideStream(  # type: ignore[override]  # answers by context.write, not yield
        self,
        requests: AsyncIterator[decision_pb2.DecideStreamRequest],
        context: grpc.aio.ServicerContext[
            decision_pb2.DecideStreamRequest, decision_pb2.DecideStreamResponse
        ],
    ) -> None:
        """Each message is answered in its own response (``server.streaming``); the stream
        itself ends OK once the caller half-closed and every message is answered."""
        answer_traceparent(context)
        counts, call = self.stream_calls, call_info(context)
        counts.streams += 1
        peer = context.peer()  # the connection (its address and port)
        connection = self._connections.setdefault(peer, Connection())
        connection.streams += 1
        stream = DecisionStream(
            self._engine, self.admission, counts, self.observe_message,
            context, call, connection, self._max_unanswered,
        )  # fmt: skip
        try:
            await stream.serve(requests)
        except BaseException:
            counts.streams_failed += 1
            raise
        else:
            counts.streams_ok += 1
        finally:
            connection.streams -= 1
            if not connection.streams:
                del self._connections[peer]


def add_tolerant_service(
    servicer: object, descriptor: ServiceDescriptor, pb2: ModuleType, server: grpc.aio.Server
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Registers a service like the generated helper (its unary methods registered, so
    that gRPC's core takes their calls by method), except that a request whose bytes do
    not decode reaches ``grpc_errors`` (INVALID_ARGUMENT), not grpc (INTERNAL); only
    bidirectional streams besides unary. Returns the unary handlers by full method name."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    unary: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        request_type = getattr(pb2, method.input_type.name)
        response_type = getattr(pb2, method.output_type.name)
        streaming = method.client_streaming or method.server_streaming
        make = (
            grpc.stream_stream_rpc_method_handler
            if streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=tolerant_parser(request_type),
            response_serializer=response_type.SerializeToString,
        )
        if not streaming:
            unary[method.name] = handlers[method.name]
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    # A long-lived stream is taken by grpc.aio's own loop, not a call slot (server.intake).
    server.add_registered_method_handlers(descriptor.full_name, unary)
    return {f"/{descriptor.full_name}/{name}": h for name, h in unary.items()}


def add_decision_service(
    servicer: DecisionServicer, server: grpc.aio.Server
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    return add_tolerant_service(
        servicer, decision_pb2.DESCRIPTOR.services_by_name["DecisionService"], decision_pb2, server
    )
