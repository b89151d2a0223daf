"""gRPC's core refuses calls before the server's Python sees them: past
``server.max_concurrent_streams`` calls on one connection (a caller with
``CALLER_OPTIONS`` gets RESOURCE_EXHAUSTED at once), and past ``QUEUED_CALLS_MAX`` calls
waiting for the event loop over all connections (CANCELLED at once): never a call queued
past its deadline."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from core.deadline import CALL_SLOTS, QUEUED_CALLS_MAX
from decision_client.channel import CALLER_OPTIONS
from decision_client.v1 import decision_pb2, decision_pb2_grpc
from server.app import DecisionApp
from server.load_metrics import core_calls
from tests.server.admin.test_admin import wait_store_rows
from tests.server.conftest import buy, replica_settings, sample_record, settle

pytestmark = [pytest.mark.integration, pytest.mark.timed]

CAP = 2


async def timed_decide(stub, request, timeout_s: float = 5.0) -> tuple[object, float]:
    """A call from a thread of its own, with the sync client: the server runs on this
    test's event loop, which grpc.aio's client would share with it."""

    def call() -> tuple[object, float]:
        started = time.monotonic()
        try:
            answer: object = stub.Decide(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            answer = exc
        return answer, (time.monotonic() - started) * 1000

    return await asyncio.to_thread(call)


@pytest.fixture
async def capped(start_app, replicas, feature_writer) -> AsyncIterator[DecisionApp]:
    """A server capped at ``CAP`` calls per connection, its replicas paused while the
    test runs: the calls it takes wait on them."""
    await feature_writer.write_many([sample_record("BTC-USD")])
    app: DecisionApp = await start_app(
        server={"max_concurrent_streams": CAP},
        torchserve=replica_settings(replicas),
        deadline={"model_call_ms": 400.0, "default_budget_ms": 1000.0},
    )
    await settle(app)
    for replica in replicas.values():
        replica.proc.pause()
    try:
        yield app
    finally:
        for replica in replicas.values():
            replica.proc.resume()


async def test_a_call_past_the_cap_is_refused_at_once_and_the_connection_goes_on(capped):
    address = f"127.0.0.1:{capped.port}"
    with (
        grpc.insecure_channel(address, options=CALLER_OPTIONS) as first,
        grpc.insecure_channel(
            address, options=[*CALLER_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        ) as second,
    ):
        for channel in (first, second):
            await asyncio.to_thread(grpc.channel_ready_future(channel).result, 5.0)
        stub = decision_pb2_grpc.DecisionServiceStub(first)
        held = [asyncio.create_task(timed_decide(stub, buy())) for _ in range(CAP)]
        await asyncio.sleep(0.1)  # both wait on the paused replicas
        refused = await asyncio.gather(*(timed_decide(stub, buy()) for _ in range(4)))
        assert not any(task.done() for task in held), "the cap was not reached"
        # The cap is per connection: another one still gets its calls taken.
        other = asyncio.create_task(
            timed_decide(decision_pb2_grpc.DecisionServiceStub(second), buy())
        )
        await asyncio.sleep(0.1)
        assert not other.done()
        answers = [answer for answer, _ in [*await asyncio.gather(*held), await other]]
        decided = [a for a in answers if isinstance(a, decision_pb2.DecideResponse)]

        for answer, ms in refused:
            assert isinstance(answer, grpc.RpcError), answer
            assert answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # At once; the bound leaves room for this test's threads on a busy machine.
            assert ms < 50, "a refused call waited for the calls in flight"
        # The calls taken are answered once the model times out, by the ladder.
        assert decided == answers, answers
        model = {decision_pb2.SOURCE_PRIMARY, decision_pb2.SOURCE_SECONDARY}
        assert not {a.source for a in decided} & model, [a.reason for a in decided]
        after, _ = await timed_decide(stub, buy())
        assert isinstance(after, decision_pb2.DecideResponse), after
    assert capped.engine.in_flight == 0

    # Every decision returned is in the audit store; refused calls made none.
    database = Path(capped.settings.audit.journal_dir).parent / "audit.db"
    rows = await wait_store_rows(database, CAP + 2, sa.text("SELECT decision_id FROM decisions"))
    assert {r.decision_id for r in rows} == {a.decision_id for a in [*decided, after]}


async def test_without_the_callers_option_a_call_past_the_cap_waits_in_the_channel(capped):
    """Why callers set ``CALLER_OPTIONS``: gRPC's default holds the call in the channel
    until a stream frees, where its deadline can pass."""
    with grpc.insecure_channel(f"127.0.0.1:{capped.port}") as channel:
        await asyncio.to_thread(grpc.channel_ready_future(channel).result, 5.0)
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        held = [asyncio.create_task(timed_decide(stub, buy())) for _ in range(CAP)]
        await asyncio.sleep(0.1)
        queued, ms = await timed_decide(stub, buy(), timeout_s=0.2)
        await asyncio.gather(*held)
    assert isinstance(queued, grpc.RpcError)
    assert queued.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ms >= 190


async def test_calls_past_the_queue_limit_are_refused_at_once_while_the_loop_is_busy(
    start_app, replicas, feature_writer
):
    """The queue limit holds for the process, whatever the connections: while the event
    loop is blocked, the call slots take what they can (and grpc.aio's own one more),
    calls past them and the queue limit are cancelled by gRPC's core and return before
    the loop is free; the calls taken and queued are decided once it is."""
    await feature_writer.write_many([sample_record("BTC-USD")])
    app: DecisionApp = await start_app(torchserve=replica_settings(replicas))
    await settle(app)
    taken = CALL_SLOTS + 1 + QUEUED_CALLS_MAX
    calls, blocked_s = taken + 3 * QUEUED_CALLS_MAX, 1.0
    channels = [  # one call per connection: no stream cap is reached
        grpc.insecure_channel(
            f"127.0.0.1:{app.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(calls)
    ]
    try:
        for channel in channels:
            await asyncio.to_thread(grpc.channel_ready_future(channel).result, 5.0)
        started_before, *_ = core_calls()
        stubs = [decision_pb2_grpc.DecisionServiceStub(channel) for channel in channels]

        def call(stub: decision_pb2_grpc.DecisionServiceStub) -> tuple[object, float]:
            started = time.monotonic()
            try:
                answer: object = stub.Decide(buy(), timeout=10.0)
            except grpc.RpcError as exc:
                answer = exc
            return answer, time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(calls) as pool:
            sent = [pool.submit(call, stub) for stub in stubs]
            # Blocks the server's loop (this one) on purpose: it takes no call meanwhile.
            time.sleep(blocked_s)  # noqa: ASYNC251
            outcomes = [await asyncio.wrap_future(f) for f in sent]
    finally:
        for channel in channels:
            channel.close()

    answered = [a for a, _ in outcomes if isinstance(a, decision_pb2.DecideResponse)]
    refused = [(a, s) for a, s in outcomes if not isinstance(a, decision_pb2.DecideResponse)]
    for answer, seconds in refused:
        assert isinstance(answer, grpc.RpcError), answer
        assert answer.code() == grpc.StatusCode.CANCELLED, answer
        assert seconds < blocked_s / 2, "a refused call waited for the loop"
    # The slots and grpc.aio's own hold a call each, the queue at most its limit.
    assert CALL_SLOTS < calls - len(refused) <= taken
    assert len(answered) == calls - len(refused) >= 1
    # gRPC's own counts, which the metrics export, see the refusals the handlers never did.
    started, succeeded, failed = core_calls()
    assert started - started_before >= calls
    assert started - succeeded - failed >= len(refused)

    # Every decision returned is in the audit store; refused calls made none.
    database = Path(app.settings.audit.journal_dir).parent / "audit.db"
    rows = await wait_store_rows(
        database, len(answered), sa.text("SELECT decision_id FROM decisions")
    )
    assert {r.decision_id for r in rows} == {a.decision_id for a in answered}

    # Refused calls made no decision; the server's call tallies count them.
    await app.stop()  # the last tally is journalled as it stops
    tallies = await wait_store_rows(
        database, 1, sa.text("SELECT calls_started, calls_refused FROM call_tallies")
    )
    assert sum(t.calls_refused for t in tallies) == len(refused)
    assert sum(t.calls_started for t in tallies) >= calls
