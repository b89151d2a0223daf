"""A caller's share of the calls in flight: the rule (pure), then a real server where one
caller floods past its share and another keeps its answers."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2

from core.domain import CallInfo, OrderRequest, Side
from server.admission import NOBODY, Caller, CallerShares, OverShare, caller_of
from server.errors import Overloaded
from tests.server.conftest import (
    buy,
    decision_stub,
    replica_settings,
    sample_record,
    status_details,
)


def order(client_id: str = "") -> OrderRequest:
    return OrderRequest("r", "BTC-USD", Side.BUY, 1.0, client_id=client_id)


def test_a_caller_is_its_verified_identity_else_its_client_id_from_its_host() -> None:
    verified = CallInfo(0, caller="spiffe://t/desk-7", verified=True)
    peer = CallInfo(0, caller="ipv4:10.0.0.7:5000")
    # A client_id is no identity; written from another host, it is another caller.
    assert caller_of(verified, [order("desk-1")]) == Caller("spiffe://t/desk-7", True)
    assert caller_of(peer, [order(), order("desk-1")]) == Caller("desk-1@ipv4:10.0.0.7", False)
    other_host = CallInfo(0, caller="ipv6:[::1]:5000")
    assert caller_of(other_host, [order("desk-1")]) == Caller("desk-1@ipv6:[::1]", False)
    assert caller_of(peer, [order()]) == NOBODY


A, B, BIG = (Caller(name, True) for name in ("a", "b", "big"))


def test_past_its_share_a_caller_is_refused_and_counted_others_are_not() -> None:
    shares = CallerShares(2, {"big": 3})
    for _ in range(2):
        shares.take(A, call_ms=1.0)
    with pytest.raises(OverShare) as refused:
        shares.take(A, call_ms=1.5)
    assert isinstance(refused.value, Overloaded)  # RESOURCE_EXHAUSTED with RetryInfo
    assert refused.value.backlog_ms == 3.0  # its own two calls, 1.5 ms each
    assert "'a' has 2 calls in flight" in str(refused.value)
    for _ in range(3):
        shares.take(BIG, call_ms=1.0)  # an override
    shares.take(B, call_ms=1.0)  # another caller is not held back
    shares.release("a")
    shares.take(A, call_ms=1.0)  # a call ended: room again
    assert shares.refused == {A: 1}
    unlimited = CallerShares(0, {})
    for _ in range(100):
        unlimited.take(A, call_ms=1.0)


def test_refusals_name_at_most_fifty_callers() -> None:
    shares = CallerShares(1, {})
    for i in range(60):
        shares.take(Caller(f"c{i}", False), call_ms=1.0)
        with pytest.raises(OverShare):
            shares.take(Caller(f"c{i}", False), call_ms=1.0)
    assert len(shares.refused) == 51 and shares.refused[Caller("other", False)] == 10


@pytest.mark.integration
async def test_a_flooding_caller_is_refused_at_once_while_another_keeps_its_answers(
    replicas, start_app, channel_to, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    app = await start_app(torchserve=replica_settings(replicas), server={"caller_share": 2})
    flood, steady = decision_stub(channel_to(app)), decision_stub(channel_to(app))
    answered: list[str] = []

    async def flooder() -> grpc.aio.AioRpcError | None:
        try:
            await flood.Decide(buy(client_id="flooder"), timeout=2.0)
        except grpc.aio.AioRpcError as error:
            return error
        return None

    # Six calls at once from a caller whose share is two: four refused at once.
    started = time.monotonic()
    refusals = [e for e in await asyncio.gather(*(flooder() for _ in range(6))) if e]
    for _ in range(5):
        answer = await steady.Decide(buy(client_id="steady"), timeout=2.0)
        answered.append(answer.decision_id)
    assert len(refusals) >= 4, [e.details() for e in refusals]
    for error in refusals:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'flooder@ipv4:127.0.0.1' has 2 calls in flight" in (error.details() or "")
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status_details(error))
    assert len(answered) == 5
    assert time.monotonic() - started < 10
    assert app.shares.refused[Caller("flooder@ipv4:127.0.0.1", False)] == len(refusals)
    counted = app.metrics.registry.get_sample_value(
        "decision_caller_refusals_total", {"caller": "flooder@ipv4:127.0.0.1", "verified": "false"}
    )
    assert counted == len(refusals)
