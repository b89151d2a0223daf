"""DecideStream through the whole server (real redis-server and TorchServe replicas): the
model answers each message, each has its audit record, the request metrics and the call
counts count messages."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from core.processes import free_port
from decision_client.stream import DecideStreamClient, MessageError
from decision_client.v1 import decision_pb2
from server.app import DecisionApp
from tests.metrics import scrape, value
from tests.server.conftest import (
    UNHURRIED,
    audited_decision,
    buy,
    replica_settings,
    sample_record,
)

pytestmark = [pytest.mark.integration, pytest.mark.timed]


async def test_streamed_orders_are_decided_audited_and_counted_as_calls(
    replicas, start_app, channel_to, feature_writer
) -> None:
    await feature_writer.write_many([sample_record("BTC-USD")])
    port = free_port()
    app: DecisionApp = await start_app(
        torchserve=replica_settings(replicas), server={"metrics_port": port}, **UNHURRIED
    )
    client = DecideStreamClient(channel_to(app))
    answers = await asyncio.gather(
        *(client.decide(buy(request_id=f"s-{i}"), timeout_s=2.0) for i in range(4))
    )
    with pytest.raises(MessageError) as bad:
        await client.decide(buy(request_id="s-bad", quantity=-1.0), timeout_s=2.0)
    await client.close()

    assert [a.request_id for a in answers] == [f"s-{i}" for i in range(4)]
    assert {a.source for a in answers} == {decision_pb2.SOURCE_PRIMARY}, answers[0].reason
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "request.quantity" in (bad.value.details() or "")
    row = await audited_decision(app, answers[0].decision_id)
    assert row["request_id"] == "s-0"

    got = await asyncio.to_thread(scrape, port)
    stream = {
        "grpc_type": "bidi_stream",
        "grpc_service": "decision.v1.DecisionService",
        "grpc_method": "DecideStream",
    }
    assert value(got, "grpc_server_started_total", **stream) == 5
    assert value(got, "grpc_server_handled_total", **stream, grpc_code="OK") == 4
    assert value(got, "grpc_server_handled_total", **stream, grpc_code="INVALID_ARGUMENT") == 1
    # The stream itself is no call: its five messages are.
    counts = app.stream_calls
    assert (counts.streams, counts.streams_ok, counts.messages) == (1, 1, 5)
    assert value(got, "decision_grpc_calls_finished_total", status="ok") >= 4
