"""DecisionService over gRPC: converts protobuf to domain objects and back, nothing more."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from proto.decision.v1 import decision_pb2, decision_pb2_grpc
from server.deadline import Budget
from server.domain import DecisionResult
from server.engine import DecisionEngine
from server.errors import grpc_errors
from server.validation import order_from_pb, orders_from_batch_pb


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
        order = order_from_pb(request)
        budget = Budget.for_call(context.time_remaining(), self._default_budget_ms)
        (result,) = await self._engine.decide([order], budget)
        return response_to_pb(result)

    @grpc_errors
    async def DecideBatch(
        self,
        request: decision_pb2.DecideBatchRequest,
        context: grpc.aio.ServicerContext[
            decision_pb2.DecideBatchRequest, decision_pb2.DecideBatchResponse
        ],
    ) -> decision_pb2.DecideBatchResponse:
        orders = orders_from_batch_pb(request, self._max_batch_size)
        budget = Budget.for_call(context.time_remaining(), self._default_budget_ms)
        results = await self._engine.decide(orders, budget)
        return decision_pb2.DecideBatchResponse(responses=[response_to_pb(r) for r in results])
