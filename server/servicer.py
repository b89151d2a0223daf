"""DecisionService over gRPC: converts protobuf to domain objects and back, nothing more."""

from __future__ import annotations

import string
import time
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from core.deadline import Budget, CallCost, CallPlan, outlasts_budget
from core.domain import CallInfo, DecisionResult, OrderRequest
from proto.decision.v1 import decision_pb2, decision_pb2_grpc
from server.engine import DecisionEngine
from server.errors import Expired, Overloaded, grpc_errors, tolerant_parser
from server.tracing import traceparent
from server.validation import order_from_pb, orders_from_batch_pb


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
    or a new one), else the caller's ``traceparent``'s: an id with a trace behind it."""
    span = trace.get_current_span().get_span_context()
    sampled = span.is_valid and span.trace_flags.sampled
    return CallInfo(
        received_at_ns=time.time_ns(),
        trace_id=(
            f"{span.trace_id:032x}" if sampled else trace_id_of(context.invocation_metadata())
        ),
        caller=context.peer(),
    )


def answer_traceparent(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Tells the caller the server span of its call (trailing ``traceparent``) when the
    call is sampled, so that a caller without tracing of its own can find the trace. Set
    first: an aborted call keeps it (``abort`` keeps the trailing metadata set before)."""
    value = traceparent(trace.get_current_span())
    if value is not None:
        context.set_trailing_metadata((("traceparent", value),))


def response_to_pb(result: DecisionResult) -> decision_pb2.DecideResponse:
    decided_at = Timestamp()
    decided_at.FromNanoseconds(result.decided_at_ns)
    return decision_pb2.DecideResponse(
        request_id=result.request_id,
        decision_id=result.decision_id,
        decision=decision_pb2.Decision.ValueType(result.decision),
        score=result.score,
        threshold=result.threshold,
        source=decision_pb2.Source.ValueType(result.source),
        model_name=result.model_name,
        model_version=result.model_version,
        reason=result.reason,
        reason_code=decision_pb2.ReasonCode.ValueType(result.reason_code),
        feature_age_ms=result.feature_age_ms,
        timings=decision_pb2.DecideTimings(
            features_us=result.features_us,
            model_us=result.model_us,
            total_us=result.total_us,
        ),
        decided_at=decided_at,
    )


class DecisionServicer(decision_pb2_grpc.DecisionServiceServicer):
    def __init__(
        self,
        engine: DecisionEngine,
        *,
        plan: CallPlan,
    ) -> None:
        self._engine = engine
        self._plan = plan
        self.call_cost = CallCost()

    def _budget(self, context: grpc.aio.ServicerContext[Any, Any]) -> Budget:
        """The call's budget; ``Expired`` when its deadline passed while it was queued
        (work for a caller that has gone only makes the calls behind it late too),
        ``Overloaded`` when the calls being served would outlast it."""
        remaining_s = context.time_remaining()
        if self._plan.expired(remaining_s):
            raise Expired()
        budget = self._plan.budget(remaining_s)
        ahead, cost_ms = self._engine.calls_in_flight, self.call_cost.ms
        if outlasts_budget(budget.remaining_ms(), ahead, cost_ms):
            raise Overloaded(backlog_ms=ahead * cost_ms)
        return budget

    async def _decide(
        self, orders: list[OrderRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> list[DecisionResult]:
        call = call_info(context)
        budget = self._budget(context)
        try:
            return await self._engine.decide(orders, budget, call)
        finally:
            self.call_cost.finished()

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


def add_tolerant_service(
    servicer: object, descriptor: ServiceDescriptor, pb2: ModuleType, server: grpc.aio.Server
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Registers a service like the generated helper (its methods registered, so that
    gRPC's core takes their calls by method), except that a request whose bytes do not
    decode reaches ``grpc_errors`` (INVALID_ARGUMENT), not grpc (INTERNAL). Returns the
    handlers by full method name."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        request_type = getattr(pb2, method.input_type.name)
        response_type = getattr(pb2, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=tolerant_parser(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    server.add_registered_method_handlers(descriptor.full_name, handlers)
    return {f"/{descriptor.full_name}/{name}": h for name, h in handlers.items()}


def add_decision_service(
    servicer: DecisionServicer, server: grpc.aio.Server
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    return add_tolerant_service(
        servicer, decision_pb2.DESCRIPTOR.services_by_name["DecisionService"], decision_pb2, server
    )
