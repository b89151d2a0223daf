"""DecideStream's contract on a real gRPC server and client (the engine a fake: the stream's
own logic): a message is a call, answered by id; bad and refused messages get their own
error response and the stream stays up; the client resends only what was not answered."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from core.deadline import CallPlan
from core.domain import Decision, DecisionResult, Source
from decision_client.stream import DecideStreamClient, MessageError
from decision_client.v1 import decision_pb2, decision_pb2_grpc
from server import load_metrics
from server.admission import CallerShares
from server.engine import DecisionEngine
from server.servicer import DecisionServicer, add_decision_service

SERVICE = "decision.v1.DecisionService"


class FakeEngine:
    """Decides each order once its symbol's gate opens (open unless closed)."""

    def __init__(self) -> None:
        self.calls_in_flight = 0
        self.budgets_ms: list[float] = []
        self.decided: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    async def decide(self, orders: Any, budget: Any, call: Any) -> list[DecisionResult]:
        (order,) = orders
        self.budgets_ms.append(budget.remaining_ms())
        self.calls_in_flight += 1
        try:
            gate = self.gates.get(order.symbol)
            if gate is not None:
                await gate.wait()
        finally:
            self.calls_in_flight -= 1
        self.decided.append(order.request_id)
        return [
            DecisionResult(
                request_id=order.request_id, decision_id=f"d-{order.request_id}",
                decision=Decision.TRADE, score=0.9, threshold=0.5, source=Source.PRIMARY,
                model_name="champion", model_version="v", reason="primary answered",
                feature_age_ms=1.0, features_us=1, model_us=1, total_us=2,
                decided_at_ns=time.time_ns(),
            )
        ]  # fmt: skip


@contextlib.asynccontextmanager
async def serving(
    engine: FakeEngine, max_unanswered: int = 4, shares: CallerShares | None = None
) -> AsyncIterator[tuple[DecisionServicer, grpc.aio.Channel]]:
    server = grpc.aio.server()
    servicer = DecisionServicer(
        cast(DecisionEngine, engine), plan=CallPlan(), max_unanswered=max_unanswered,
        shares=shares,
    )  # fmt: skip
    add_decision_service(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    servicer.port = port  # type: ignore[attr-defined]  # for a second connection
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield servicer, channel
    finally:
        await server.stop(grace=None)


def order(
    request_id: str, symbol: str = "BTC-USD", quantity: float = 1.0, client_id: str = ""
) -> Any:
    return decision_pb2.DecideRequest(
        request_id=request_id, symbol=symbol, side=decision_pb2.SIDE_BUY, quantity=quantity,
        client_id=client_id,
    )  # fmt: skip


def message(request: decision_pb2.DecideRequest, timeout_ms: int = 0) -> Any:
    pb = decision_pb2.DecideStreamRequest(request=request)
    if timeout_ms:
        pb.timeout.FromMilliseconds(timeout_ms)
    return pb


async def test_each_message_is_answered_by_its_id_as_it_is_ready() -> None:
    engine = FakeEngine()
    engine.gates["SLOW-USD"] = asyncio.Event()
    async with serving(engine) as (servicer, channel):
        client = DecideStreamClient(channel)
        slow = asyncio.create_task(client.decide(order("a", "SLOW-USD"), timeout_s=2.0))
        fast = await client.decide(order("b"), timeout_s=2.0)
        assert fast.request_id == "b" and fast.decision_id == "d-b" and not slow.done()
        engine.gates["SLOW-USD"].set()
        assert (await slow).request_id == "a"
        await client.close()
    assert client.streams_opened == 1
    counts = servicer.stream_calls
    assert (counts.streams, counts.streams_ok, counts.messages, counts.answered) == (1, 1, 2, 2)


async def test_bad_messages_get_an_error_each_and_the_stream_stays_up() -> None:
    engine = FakeEngine()
    async with serving(engine) as (servicer, channel):
        call = decision_pb2_grpc.DecisionServiceStub(channel).DecideStream()
        await call.write(message(order("")))  # no id
        await call.write(message(order("x", symbol="btc usd", quantity=-1.0)))
        await call.write(message(order("ok")))
        await call.done_writing()
        responses = [r async for r in call]
        assert await call.code() is grpc.StatusCode.OK
    by_id = {r.request_id: r for r in responses}
    assert by_id[""].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "request.request_id" in by_id[""].error.message
    bad = by_id["x"].error
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert {v.field for v in bad.field_violations} == {"request.symbol", "request.quantity"}
    assert by_id["ok"].response.decision_id == "d-ok"
    assert engine.decided == ["ok"]
    assert servicer.stream_calls.failed == 2 and servicer.stream_calls.answered == 1


async def test_undecodable_bytes_get_invalid_argument_not_the_streams_end() -> None:
    async with serving(FakeEngine()) as (_, channel):
        raw: Any = channel.stream_stream("/decision.v1.DecisionService/DecideStream")
        call = raw(iter([b"\xff\xff\xff", message(order("ok")).SerializeToString()]))
        responses = [decision_pb2.DecideStreamResponse.FromString(r) async for r in call]
        assert await call.code() is grpc.StatusCode.OK
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses[1].response.request_id == "ok"


async def test_a_message_past_the_streams_cap_is_refused_at_once_never_queued() -> None:
    engine = FakeEngine()
    engine.gates["SLOW-USD"] = asyncio.Event()
    async with serving(engine, max_unanswered=2) as (servicer, channel):
        client = DecideStreamClient(channel)
        held = [
            asyncio.create_task(client.decide(order(f"h{i}", "SLOW-USD"), timeout_s=2.0))
            for i in range(2)
        ]
        await asyncio.sleep(0.1)
        begun = time.perf_counter()
        with pytest.raises(MessageError) as refused:
            await client.decide(order("past"), timeout_s=2.0)
        assert time.perf_counter() - begun < 1.0  # not held until the others end
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 messages unanswered on this connection" in (refused.value.details() or "")
        assert refused.value.retry_delay_s > 0
        engine.gates["SLOW-USD"].set()
        assert [(await h).request_id for h in held] == ["h0", "h1"]
        assert (await client.decide(order("after"), timeout_s=2.0)).request_id == "after"
        await client.close()
    assert "past" not in engine.decided
    counts = servicer.stream_calls
    # The refusal failed, as a unary call its handler refused.
    assert (counts.messages, counts.answered, counts.failed) == (4, 3, 1)


async def test_a_streams_messages_count_against_their_callers_share() -> None:
    engine = FakeEngine()
    engine.gates["SLOW-USD"] = asyncio.Event()
    async with serving(engine, shares=CallerShares(1, {})) as (_, channel):
        client = DecideStreamClient(channel)
        held = asyncio.create_task(
            client.decide(order("h", "SLOW-USD", client_id="desk"), timeout_s=2.0)
        )
        await asyncio.sleep(0.1)
        with pytest.raises(MessageError) as refused:
            await client.decide(order("past", client_id="desk"), timeout_s=2.0)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'desk@ipv4:127.0.0.1' has 1 calls in flight" in (refused.value.details() or "")
        assert (await client.decide(order("other", client_id="desk-2"), timeout_s=2.0)).request_id
        engine.gates["SLOW-USD"].set()
        await held
        assert (await client.decide(order("after", client_id="desk"), timeout_s=2.0)).request_id
        await client.close()
    assert "past" not in engine.decided


@pytest.mark.parametrize(("ahead", "refused"), [(0, False), (200, True)])
async def test_each_message_meets_the_process_backlog_check(ahead: int, refused: bool) -> None:
    engine = FakeEngine()
    engine.calls_in_flight = ahead  # 200 calls of 0.5 ms each outlast a 38 ms budget
    async with serving(engine) as (_, channel):
        client = DecideStreamClient(channel)
        if refused:
            with pytest.raises(MessageError) as error:
                await client.decide(order("a"), timeout_s=0.05)
            assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.value.retry_delay_s == pytest.approx(0.1)
        else:
            assert (await client.decide(order("a"), timeout_s=0.05)).request_id == "a"
        await client.close()


async def test_a_messages_budget_is_its_own_timeout_within_the_streams_deadline() -> None:
    engine = FakeEngine()
    async with serving(engine) as (_, channel):
        call = decision_pb2_grpc.DecisionServiceStub(channel).DecideStream(timeout=0.5)
        for i, timeout_ms in enumerate((30, 0, 5_000)):
            await call.write(message(order(f"m{i}"), timeout_ms))
        await call.done_writing()
        assert len([r async for r in call]) == 3
    own, default, stream = engine.budgets_ms
    margin = CallPlan().response_margin_ms
    assert 30 - margin - 5 < own <= 30 - margin
    assert default == pytest.approx(CallPlan().default_budget_ms, abs=5)
    assert 500 - margin - 50 < stream <= 500 - margin  # the stream's 0.5 s, not 5 s


@contextlib.asynccontextmanager
async def stream_server(handler: Any) -> AsyncIterator[grpc.aio.Channel]:
    """A server whose DecideStream is ``handler`` (an async generator function)."""
    server = grpc.aio.server()
    method = grpc.stream_stream_rpc_method_handler(
        handler,
        request_deserializer=decision_pb2.DecideStreamRequest.FromString,
        response_serializer=decision_pb2.DecideStreamResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"DecideStream": method}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(grace=None)


async def test_the_client_resends_what_a_stream_left_unanswered_and_only_that() -> None:
    """The first stream answers its first message and ends at the second (as a
    connection past its maximum age ends); the second stream answers everything."""
    sent: list[str] = []
    streams = 0

    async def ends_once(requests: Any, context: Any) -> AsyncIterator[Any]:
        nonlocal streams
        streams += 1
        first = streams == 1
        async for request in requests:
            sent.append(request.request.request_id)
            if first and len(sent) > 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection age reached")
            response = decision_pb2.DecideResponse(request_id=request.request.request_id)
            yield decision_pb2.DecideStreamResponse(
                request_id=request.request.request_id, response=response
            )

    async with stream_server(ends_once) as channel:
        client = DecideStreamClient(channel)
        first = await client.decide(order("a"), timeout_s=2.0)
        second = await client.decide(order("b"), timeout_s=2.0)
        await client.close()
    assert (first.request_id, second.request_id) == ("a", "b")
    assert sent == ["a", "b", "b"] and client.streams_opened == 2


async def test_a_message_unanswered_twice_fails_with_the_streams_status() -> None:
    async def abort_all(requests: Any, context: Any) -> AsyncIterator[Any]:
        async for _ in requests:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        yield decision_pb2.DecideStreamResponse()  # never reached

    async with stream_server(abort_all) as channel:
        client = DecideStreamClient(channel)
        with pytest.raises(MessageError) as error:
            await client.decide(order("a"), timeout_s=2.0)
        await client.close()
    assert error.value.code() is grpc.StatusCode.UNAVAILABLE
    assert client.streams_opened == 2


def test_a_stream_counts_as_its_messages_in_the_core_calls(monkeypatch) -> None:
    """Two streams the core counts as calls (one ended OK, one open) carry five messages:
    three answered, one failed, one refused. The tally's calls are the messages."""
    monkeypatch.setattr(load_metrics, "core_calls", lambda: load_metrics.CoreCalls(10, 7, 1))
    counts = load_metrics.StreamCalls()
    counts.streams, counts.streams_ok = 2, 1
    counts.messages, counts.answered, counts.failed = 5, 3, 1
    # 10 - 2 + 5 started; 7 - 1 + 3 answered; 1 - 0 + 1 failed: one refused.
    assert counts.calls() == load_metrics.CoreCalls(13, 9, 2)


async def test_a_negative_timeout_is_invalid_and_a_cancelled_message_counts_failed() -> None:
    engine = FakeEngine()
    engine.gates["SLOW-USD"] = asyncio.Event()  # never opens
    async with serving(engine) as (servicer, channel):
        call = decision_pb2_grpc.DecisionServiceStub(channel).DecideStream()
        bad = message(order("neg"))
        bad.timeout.FromMilliseconds(-5)
        await call.write(bad)
        first: Any = await call.read()
        assert first.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert [v.field for v in first.error.field_violations] == ["timeout"]
        await call.write(message(order("held", "SLOW-USD")))
        await asyncio.sleep(0.1)
        call.cancel()  # the caller goes away with "held" unanswered
        await asyncio.sleep(0.2)
    counts = servicer.stream_calls
    assert (counts.messages, counts.answered, counts.failed) == (2, 0, 2)
    assert (counts.streams, counts.streams_ok, counts.streams_failed) == (1, 0, 1)


async def test_an_id_stays_taken_until_its_late_answer_comes() -> None:
    engine = FakeEngine()
    engine.gates["SLOW-USD"] = asyncio.Event()
    async with serving(engine) as (_, channel):
        client = DecideStreamClient(channel)
        with pytest.raises(MessageError) as late:
            await client.decide(order("a", "SLOW-USD"), timeout_s=0.1)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(ValueError, match="not taken"):
            await client.decide(order("a"), timeout_s=1.0)  # still being decided
        engine.gates["SLOW-USD"].set()  # the late answer arrives and is dropped
        for _ in range(50):
            if "a" in engine.decided:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        answer = await client.decide(order("a"), timeout_s=1.0)
        assert answer.request_id == "a"
        await client.close()
    assert engine.decided == ["a", "a"]


async def test_a_resent_message_carries_what_is_left_of_its_timeout() -> None:
    timeouts_ms: list[float] = []
    streams = 0

    async def ends_first(requests: Any, context: Any) -> AsyncIterator[Any]:
        nonlocal streams
        streams += 1
        async for request in requests:
            timeouts_ms.append(request.timeout.ToMilliseconds())
            if streams == 1:
                await asyncio.sleep(0.2)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection age reached")
            yield decision_pb2.DecideStreamResponse(
                request_id=request.request.request_id,
                response=decision_pb2.DecideResponse(request_id=request.request.request_id),
            )

    async with stream_server(ends_first) as channel:
        client = DecideStreamClient(channel)
        assert (await client.decide(order("a"), timeout_s=1.0)).request_id == "a"
        await client.close()
    first, resent = timeouts_ms
    assert first == 1000 and 700 < resent < 810


async def test_close_is_bounded_and_fails_what_is_still_waiting() -> None:
    async def never_answers(requests: Any, context: Any) -> AsyncIterator[Any]:
        async for _ in requests:
            pass
        await asyncio.sleep(30)  # half-closed, and still nothing
        yield decision_pb2.DecideStreamResponse()

    async with stream_server(never_answers) as channel:
        client = DecideStreamClient(channel)
        waiting = asyncio.create_task(client.decide(order("a"), timeout_s=20.0))
        await asyncio.sleep(0.1)
        begun = time.perf_counter()
        await client.close(timeout_s=0.2)
        assert time.perf_counter() - begun < 2.0
        with pytest.raises(MessageError):
            await waiting
    assert client.streams_opened == 1  # nothing resent after close


async def test_more_streams_on_a_connection_do_not_raise_its_cap() -> None:
    """Two streams on one channel (one connection), a cap of 2: one message held on each,
    a third on either is refused; a stream on another connection has its own cap."""
    engine = FakeEngine()
    engine.gates["SLOW-USD"] = asyncio.Event()
    async with serving(engine, max_unanswered=2) as (servicer, channel):
        port = servicer.port  # type: ignore[attr-defined]
        first, second = DecideStreamClient(channel), DecideStreamClient(channel)
        held = [
            asyncio.create_task(c.decide(order(f"h{i}", "SLOW-USD"), timeout_s=2.0))
            for i, c in enumerate((first, second))
        ]
        await asyncio.sleep(0.1)
        with pytest.raises(MessageError) as refused:
            await second.decide(order("past"), timeout_s=2.0)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as other:
            elsewhere = DecideStreamClient(other)
            assert (await elsewhere.decide(order("x"), timeout_s=2.0)).request_id == "x"
            await elsewhere.close()
        engine.gates["SLOW-USD"].set()
        await asyncio.gather(*held)
        await first.close()
        await second.close()
    assert servicer._connections == {}  # forgotten with their streams
