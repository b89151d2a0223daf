"""DecisionService over gRPC: converts protobuf to domain objects and back, nothing more."""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from proto.decision.v1 import decision_pb2, decision_pb2_grpc
from server.deadline import Budget
from server.domain import CallInfo, DecisionResult
from server.engine import DecisionEngine
from server.errors import InvalidArgument, grpc_errors
from server.validation import order_from_pb, orders_from_batch_pb

M = TypeVar("M", bound=Message)


class UndecodableRequest:
    """Stands in for a request whose bytes are not the expected message.

    grpc answers INTERNAL when a deserializer raises; bad input must get
    INVALID_ARGUMENT, so decoding never raises and the handler rejects this instead.
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


def reject_undecodable(request: object) -> None:
    if isinstance(request, UndecodableRequest):
        raise InvalidArgument("request", f"not a valid {request.message_name}")


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
    return CallInfo(
        received_at_ns=time.time_ns(),
        trace_id=trace_id_of(context.invocation_metadata()),
        caller=context.peer(),
    )


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
        self, engine: DecisionEngine, *, default_budget_ms: float, max_batch_size: int
    ) -> None:
        self._engine = engine
        self._default_budget_ms = default_budget_ms
        self._max_batch_size = max_batch_size

    @grpc_errors
    async def Decide(
        self,
        request: decision_pb2.DecideRequest,
        context: grpc.aio.ServicerContext[decision_pb2.DecideRequest, decision_pb2.DecideResponse],
    ) -> decision_pb2.DecideResponse:
        call = call_info(context)
        reject_undecodable(request)
        order = order_from_pb(request)
        budget = Budget.for_call(context.time_remaining(), self._default_budget_ms)
        (result,) = await self._engine.decide([order], budget, call)
        return response_to_pb(result)

    @grpc_errors
    async def DecideBatch(
        self,
        request: decision_pb2.DecideBatchRequest,
        context: grpc.aio.ServicerContext[
            decision_pb2.DecideBatchRequest, decision_pb2.DecideBatchResponse
        ],
    ) -> decision_pb2.DecideBatchResponse:
        call = call_info(context)
        reject_undecodable(request)
        orders = orders_from_batch_pb(request, self._max_batch_size)
        budget = Budget.for_call(context.time_remaining(), self._default_budget_ms)
        results = await self._engine.decide(orders, budget, call)
        return decision_pb2.DecideBatchResponse(responses=[response_to_pb(r) for r in results])


def add_decision_service(servicer: DecisionServicer, server: grpc.aio.Server) -> None:
    """Registers DecisionService like the generated helper, with tolerant request parsing."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Decide": grpc.unary_unary_rpc_method_handler(
            servicer.Decide,
            request_deserializer=tolerant_parser(decision_pb2.DecideRequest),
            response_serializer=decision_pb2.DecideResponse.SerializeToString,
        ),
        "DecideBatch": grpc.unary_unary_rpc_method_handler(
            servicer.DecideBatch,
            request_deserializer=tolerant_parser(decision_pb2.DecideBatchRequest),
            response_serializer=decision_pb2.DecideBatchResponse.SerializeToString,
        ),
    }
    service = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
