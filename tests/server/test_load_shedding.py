"""Load shedding: past ``decision.max_in_flight`` a call is answered at once, rejected
or decided by the fallback ladder, never queued behind the decisions in flight."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2

from proto.decision.v1 import decision_pb2
from server.app import DecisionApp
from server.errors import OVERLOADED_RETRY_DELAY_MS
from tests.server.admin.test_admin import wait_store_rows
from tests.server.conftest import (
    buy,
    decision_stub,
    replica_settings,
    sample_record,
    settle,
    status_details,
)

pytestmark = pytest.mark.integration


async def timed_decide(stub, request) -> tuple[object, float]:
    started = time.monotonic()
    try:
        answer: object = await stub.Decide(request, timeout=5.0)
    except grpc.aio.AioRpcError as exc:
        answer = exc
    return answer, (time.monotonic() - started) * 1000


@pytest.mark.parametrize("action", ["reject", "rules"])
async def test_calls_past_the_bound_are_answered_at_once(
    action, start_app, replicas, channel_to, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    app: DecisionApp = await start_app(
        # Both replicas paused below: the two admitted decisions wait on them.
        torchserve=replica_settings(replicas),
        deadline={"model_call_ms": 400.0, "default_budget_ms": 1000.0},
        decision={"max_in_flight": 2, "overload_action": action},
    )
    await settle(app)
    stub = decision_stub(channel_to(app))
    for replica in replicas.values():
        replica.proc.pause()
    try:
        admitted = [asyncio.create_task(timed_decide(stub, buy())) for _ in range(2)]
        await asyncio.sleep(0.05)  # both are waiting on the paused replicas
        shed = await asyncio.gather(*(timed_decide(stub, buy()) for _ in range(4)))
        assert not any(task.done() for task in admitted), "the bound was not reached"
    finally:
        for replica in replicas.values():
            replica.proc.resume()
    held = await asyncio.gather(*admitted)

    for answer, _ in held:
        assert isinstance(answer, decision_pb2.DecideResponse), answer
    for answer, ms in shed:
        assert ms < 200, "a shed call waited for the decisions in flight"
        if action == "reject":
            assert isinstance(answer, grpc.aio.AioRpcError)
            assert answer.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 decisions in flight (limit 2)" in (answer.details() or "")
            retry = error_details_pb2.RetryInfo()
            assert status_details(answer)[0].Unpack(retry)
            assert retry.retry_delay.ToMilliseconds() == OVERLOADED_RETRY_DELAY_MS
        else:
            assert isinstance(answer, decision_pb2.DecideResponse), answer
            assert answer.source == decision_pb2.SOURCE_RULES
            assert "overloaded: model skipped" in answer.reason
    assert app.engine.shed == 4
    assert app.engine.in_flight == 0

    # Every decision returned is in the audit store; rejected calls made none.
    returned = [a for a, _ in [*held, *shed] if isinstance(a, decision_pb2.DecideResponse)]
    database = Path(app.settings.audit.journal_dir).parent / "audit.db"
    rows = await wait_store_rows(
        database, len(returned), sa.text("SELECT decision_id, source FROM decisions")
    )
    assert {r.decision_id for r in rows} == {a.decision_id for a in returned}
    assert len(rows) == (2 if action == "reject" else 6)
