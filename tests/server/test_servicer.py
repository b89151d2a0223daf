"""The servicer's own decisions before the engine (pure logic: a fake context and engine)."""

from __future__ import annotations

from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from core.deadline import CallPlan
from decision_client.v1 import decision_pb2
from server.engine import DecisionEngine
from server.servicer import DecisionServicer


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, remaining_s: float | None) -> None:
        self.remaining_s = remaining_s
        self.code: grpc.StatusCode | None = None
        self.trailing: Any = ()

    def time_remaining(self) -> float | None:
        return self.remaining_s

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def peer_identities(self) -> None:  # no client certificate
        return None

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing_metadata: object = ()
    ) -> None:
        self.code = code
        self.trailing = trailing_metadata
        raise Aborted(details)


class NoEngine:
    """Fails the test if a call reaches it."""

    calls_in_flight = 0

    async def decide(self, *args: Any) -> list[Any]:
        raise AssertionError("an expired call reached the engine")


async def test_a_call_whose_deadline_passed_in_the_queue_gets_no_decision() -> None:
    servicer = DecisionServicer(
        cast(DecisionEngine, NoEngine()),
        plan=CallPlan(default_budget_ms=50.0, response_margin_ms=5.0),
    )
    context = FakeContext(remaining_s=-0.002)
    request = decision_pb2.DecideRequest(symbol="BTC-USD", side=decision_pb2.SIDE_BUY, quantity=1.0)
    with pytest.raises(Aborted, match="deadline passed"):
        await servicer.Decide(request, cast(Any, context))
    assert context.code is grpc.StatusCode.DEADLINE_EXCEEDED


class BudgetRecorder:
    """Keeps the budget a call was given; decides nothing."""

    calls_in_flight = 0

    def __init__(self) -> None:
        self.remaining_ms = 0.0

    async def decide(self, orders: Any, budget: Any, call: Any) -> list[Any]:
        self.remaining_ms = budget.remaining_ms()
        return []


@pytest.mark.parametrize(("margin_ms", "left_at_most"), [(5.0, 45.0), (12.0, 38.0)])
@pytest.mark.timed
async def test_the_server_plans_to_answer_its_margin_before_the_deadline(
    margin_ms: float, left_at_most: float
) -> None:
    engine = BudgetRecorder()
    servicer = DecisionServicer(
        cast(DecisionEngine, engine),
        plan=CallPlan(default_budget_ms=50.0, response_margin_ms=margin_ms),
    )
    request = decision_pb2.DecideRequest(symbol="BTC-USD", side=decision_pb2.SIDE_BUY, quantity=1.0)
    with pytest.raises(Aborted):  # the recorder decided nothing: an internal error
        await servicer.Decide(request, cast(Any, FakeContext(remaining_s=0.050)))
    # 50 ms left less the margin (and the little that has passed).
    assert left_at_most - 3.0 < engine.remaining_ms <= left_at_most


class BusyEngine:
    """Serving calls already; notes whether a call reached it, decides nothing."""

    def __init__(self, calls_in_flight: int) -> None:
        self.calls_in_flight = calls_in_flight
        self.reached = False

    async def decide(self, *args: Any) -> list[Any]:
        self.reached = True
        return []


@pytest.mark.parametrize(("ahead", "refused"), [(0, False), (37, False), (38, True)])
async def test_a_call_the_calls_ahead_would_make_late_is_refused_before_any_work(
    ahead: int, refused: bool
) -> None:
    """38 ms of budget (50 less the 12 ms margin), each call 1 ms: the 38th call fits,
    the 39th is refused with RESOURCE_EXHAUSTED and a RetryInfo; a call with none ahead
    is always taken (the ladder answers it in whatever time it has)."""
    engine = BusyEngine(ahead)
    servicer = DecisionServicer(
        cast(DecisionEngine, engine), plan=CallPlan(response_margin_ms=12.0)
    )
    servicer.call_cost.ms = 1.0
    context = FakeContext(remaining_s=0.0505)
    request = decision_pb2.DecideRequest(symbol="BTC-USD", side=decision_pb2.SIDE_BUY, quantity=1.0)
    with pytest.raises(Aborted) as raised:  # refused, or the engine decided nothing
        await servicer.Decide(request, cast(Any, context))
    assert engine.reached is not refused
    if refused:
        assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "refused before any work" in str(raised.value)
        (_, value), *_ = context.trailing
        status = status_pb2.Status.FromString(value)
        (detail,) = status.details
        retry = error_details_pb2.RetryInfo()
        assert detail.Unpack(retry)
        assert retry.retry_delay.ToMilliseconds() == ahead


def test_one_reason_type_equal_to_the_protos_reason_code_number_for_number() -> None:
    """``core.domain.Reason`` is what the engine, the metrics and the audit record carry;
    the answer's ``reason_code`` is its number, so the two must never part."""
    from core.domain import Reason

    proto = {
        name.removeprefix("REASON_CODE_"): number
        for name, number in decision_pb2.ReasonCode.items()
        if number != decision_pb2.REASON_CODE_UNSPECIFIED
    }
    assert {reason.name: reason.value for reason in Reason} == proto
    assert Reason.MODEL_BREAKER_OPEN.label == "model_breaker_open"  # the metrics' label
