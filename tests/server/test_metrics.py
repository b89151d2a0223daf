"""The /metrics endpoint after real traffic: request counts and latency by method and
status (go-grpc-prometheus's names), decisions by source, each replica's calls and
breaker state, and the process and GC collectors, scraped over HTTP."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.processes import free_port
from proto.decision.v1 import admin_pb2, admin_pb2_grpc, decision_pb2
from server.app import DecisionApp
from tests.server.conftest import (
    TOKENS,
    buy,
    decision_stub,
    replica_settings,
    sample_record,
)

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc(method: str, service: str = "decision.v1.DecisionService") -> dict[str, str]:
    return {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}


async def test_traffic_moves_the_request_decision_and_replica_metrics(
    replicas, start_app, channel_to, feature_writer
) -> None:
    await feature_writer.write_many([sample_record("BTC-USD")])
    port = free_port()
    app: DecisionApp = await start_app(
        torchserve=replica_settings(replicas),
        telemetry={"metrics_port": port},
        admin={"tokens": TOKENS},
    )
    stub = decision_stub(channel_to(app))
    for _ in range(5):
        assert (await stub.Decide(buy(), timeout=2.0)).source == decision_pb2.SOURCE_PRIMARY
    missing = await stub.Decide(buy("ETH-USD"), timeout=2.0)  # no features
    assert missing.source == decision_pb2.SOURCE_ABSTAIN
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
    assert value(got, "grpc_server_started_total", **decide) == 9
    assert value(got, "grpc_server_handled_total", **decide, grpc_code="OK") == 8
    assert value(got, "grpc_server_handled_total", **decide, grpc_code="INVALID_ARGUMENT") == 1
    assert value(got, "grpc_server_handling_seconds_count", **decide) == 9
    assert value(got, "grpc_server_handling_seconds_bucket", **decide, le="+Inf") == 9
    assert 0 < value(got, "grpc_server_handling_seconds_bucket", **decide, le="0.01") <= 9
    admin = rpc("GetStatus", "decision.v1.AdminService")
    assert value(got, "grpc_server_handled_total", **admin, grpc_code="UNAUTHENTICATED") == 1

    primary = sum(
        value(got, "decision_decisions_total", source="primary", decision=d)
        for d in ("trade", "no_trade")
    )
    assert primary == 5
    assert value(got, "decision_decisions_total", source="abstain", decision="abstain") == 1
    secondary = sum(
        value(got, "decision_decisions_total", source="secondary", decision=d)
        for d in ("trade", "no_trade")
    )
    assert secondary == 2

    assert value(got, "decision_model_calls_total", replica="primary", outcome="ok") == 5
    assert value(got, "decision_model_calls_total", replica="primary", outcome="failed") == 2
    assert value(got, "decision_model_calls_total", replica="secondary", outcome="ok") == 2
    # Two failures do not open a breaker that opens at five.
    assert value(got, "decision_breaker_state", replica="primary", state="closed") == 1
    assert value(got, "decision_breaker_state", replica="primary", state="open") == 0

    assert value(got, "process_cpu_seconds_total") > 0
    assert value(got, "process_resident_memory_bytes") > 0
    assert any(name == "python_gc_objects_collected_total" for name, _ in got)
