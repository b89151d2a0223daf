"""The /metrics endpoint after real traffic: request counts and latency by method and
status (go-grpc-prometheus's names), decisions by source, each replica's calls and
breaker state, and the process and GC collectors, scraped over HTTP."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from core.processes import free_port
from decision_client.v1 import admin_pb2, admin_pb2_grpc, decision_pb2
from server.app import DecisionApp
from tests.metrics import scrape, value
from tests.server.conftest import (
    TOKENS,
    UNHURRIED,
    buy,
    decision_stub,
    replica_settings,
    sample_record,
)

pytestmark = [pytest.mark.integration, pytest.mark.timed]  # a Decide within 10 ms


def rpc(method: str, service: str = "decision.v1.DecisionService") -> dict[str, str]:
    return {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}


async def test_traffic_moves_the_request_decision_and_replica_metrics(
    replicas, start_app, channel_to, feature_writer
) -> None:
    await feature_writer.write_many(
        [sample_record("BTC-USD"), sample_record("SOL-USD", age_ms=300_000)]
    )
    port = free_port()
    app: DecisionApp = await start_app(
        torchserve=replica_settings(replicas),
        server={"metrics_port": port},
        admin={"tokens": TOKENS},
        **UNHURRIED,
    )
    stub = decision_stub(channel_to(app))
    for _ in range(5):
        assert (await stub.Decide(buy(), timeout=2.0)).source == decision_pb2.SOURCE_PRIMARY
    missing = await stub.Decide(buy("ETH-USD"), timeout=2.0)  # no features
    assert missing.source == decision_pb2.SOURCE_ABSTAIN
    stale = await stub.Decide(buy("SOL-USD"), timeout=2.0)
    assert stale.source == decision_pb2.SOURCE_ABSTAIN
    assert "features stale" in stale.reason
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Decide(buy(quantity=-1.0), timeout=2.0)
    replicas["primary"].proc.kill()
    try:
        for _ in range(2):
            answer = await stub.Decide(buy(), timeout=2.0)
            assert answer.source == decision_pb2.SOURCE_SECONDARY, answer.reason
    finally:
        replicas["primary"].restart()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError):  # no token
            await admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
                admin_pb2.GetStatusRequest(), timeout=2.0
            )

    got = await asyncio.to_thread(scrape, port)

    decide = rpc("Decide")
    assert value(got, "grpc_server_started_total", **decide) == 10
    assert value(got, "grpc_server_handled_total", **decide, grpc_code="OK") == 9
    assert value(got, "grpc_server_handled_total", **decide, grpc_code="INVALID_ARGUMENT") == 1
    assert value(got, "grpc_server_handling_seconds_count", **decide) == 10
    assert value(got, "grpc_server_handling_seconds_bucket", **decide, le="+Inf") == 10
    assert 0 < value(got, "grpc_server_handling_seconds_bucket", **decide, le="0.01") <= 10
    admin = rpc("GetStatus", "decision.v1.AdminService")
    assert value(got, "grpc_server_handled_total", **admin, grpc_code="UNAUTHENTICATED") == 1

    primary = sum(
        value(got, "decision_decisions_total", source="primary", decision=d)
        for d in ("trade", "no_trade")
    )
    assert primary == 5
    assert value(got, "decision_decisions_total", source="abstain", decision="abstain") == 2
    secondary = sum(
        value(got, "decision_decisions_total", source="secondary", decision=d)
        for d in ("trade", "no_trade")
    )
    assert secondary == 2
    for source, count in (("primary", 5), ("secondary", 2), ("abstain", 2)):
        assert value(got, "decision_latency_seconds_count", source=source) == count
        assert value(got, "decision_latency_seconds_bucket", source=source, le="+Inf") == count
    # Exported at zero, not missing (``value`` reads a missing series as 0).
    assert ("decision_latency_seconds_count", frozenset({("source", "rules")})) in got
    assert value(got, "decision_latency_seconds_count", source="rules") == 0
    # Why the model did not answer, by code: only the two abstentions (the secondary's
    # answers are the model's).
    fallbacks = {
        labels: count for (name, labels), count in got.items() if name == "decision_fallbacks_total"
    }
    assert fallbacks == {
        frozenset({"source": "abstain", "reason": "no_features"}.items()): 1,
        frozenset({"source": "abstain", "reason": "features_stale"}.items()): 1,
    }

    # The stale record's age is counted (300 s: above the last bound, 60 s; the test's
    # max age is 120 s); the order without features is not.
    assert value(got, "decision_feature_age_seconds_count") == 8
    assert value(got, "decision_feature_age_seconds_bucket", le="60.0") == 7
    assert value(got, "decision_feature_age_seconds_bucket", le="+Inf") == 8

    assert value(got, "decision_model_calls_total", replica="primary", outcome="ok") == 5
    assert value(got, "decision_model_calls_total", replica="primary", outcome="failed") == 2
    assert value(got, "decision_model_calls_total", replica="secondary", outcome="ok") == 2
    for replica, outcome, count in (("primary", "ok", 5), ("primary", "failed", 2)):
        labels = {"replica": replica, "outcome": outcome}
        assert value(got, "decision_model_call_seconds_count", **labels) == count
        assert value(got, "decision_model_call_seconds_bucket", **labels, le="+Inf") == count
        assert value(got, "decision_model_call_seconds_sum", **labels) > 0
    # Two failures do not open a breaker that opens at five.
    assert value(got, "decision_breaker_state", replica="primary", state="closed") == 1
    open_state = frozenset({("replica", "primary"), ("state", "open")})
    assert ("decision_breaker_state", open_state) in got
    assert value(got, "decision_breaker_state", replica="primary", state="open") == 0

    assert ("decision_canary_weight", frozenset()) in got
    assert value(got, "decision_canary_weight") == 0
    assert ("decision_canary_rollbacks_total", frozenset()) in got

    assert value(got, "process_cpu_seconds_total") > 0
    assert value(got, "process_resident_memory_bytes") > 0
    assert any(name == "python_gc_objects_collected_total" for name, _ in got)
