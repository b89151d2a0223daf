"""Live drift in a real server: decisions the primary scores fill the window, the PSI
against the primary's own archive reference shows in GetStatus and on /metrics."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest

from core.processes import free_port
from decision_client.v1 import admin_pb2, admin_pb2_grpc, decision_pb2
from feature_cache.schema import FEATURE_NAMES
from server.app import DecisionApp
from tests.metrics import scrape, value
from tests.server.conftest import (
    TOKENS,
    UNHURRIED,
    VIEWER,
    buy,
    decision_stub,
    replica_settings,
    sample_record,
)

pytestmark = pytest.mark.integration

DECISIONS = 20


async def test_drift_of_scored_decisions_shows_in_status_and_metrics(
    replicas, model_store, start_app, channel_to, feature_writer, monkeypatch
) -> None:
    monkeypatch.setattr("server.drift.MIN_SAMPLES", 10)
    monkeypatch.setattr("server.drift.SAMPLE_EVERY_S", 0.0)  # every decision, not one in 0.36 s
    monkeypatch.setattr("server.drift.MIN_SPAN_S", 0.0)
    monkeypatch.setattr("server.drift.INTERVAL_S", 0.1)
    store, champion = model_store
    await feature_writer.write_many([sample_record("BTC-USD")])
    port = free_port()
    app: DecisionApp = await start_app(
        torchserve=replica_settings(replicas),
        server={"metrics_port": port},
        admin={"tokens": TOKENS},
        drift={"model_store": str(store)},
        **UNHURRIED,
    )
    stub = decision_stub(channel_to(app))
    for _ in range(DECISIONS):
        answer = await stub.Decide(buy(), timeout=2.0)
        assert answer.source == decision_pb2.SOURCE_PRIMARY, answer.reason

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        deadline = time.monotonic() + 10
        while True:
            status = await admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=VIEWER)
            done = not status.drift.problem and status.drift.samples == DECISIONS
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    drift = status.drift
    assert drift.enabled and drift.problem == ""
    assert drift.model_version == champion.version
    assert (drift.samples, drift.scores) == (DECISIONS, DECISIONS)
    assert {f.feature for f in drift.features} == set(FEATURE_NAMES)
    # Twenty copies of one feature row sit in one decile bin of each reference: far
    # from the training distribution wherever the reference has more than one bin.
    assert all(math.isfinite(f.psi) for f in drift.features)
    assert sum(f.psi > 0.25 for f in drift.features) >= len(FEATURE_NAMES) // 2
    assert (drift.watch_psi, drift.act_psi) == (0.1, 0.25)

    got = await asyncio.to_thread(scrape, port)
    for feature in drift.features:
        exported = value(got, "decision_drift_psi", feature=feature.feature)
        assert exported == pytest.approx(feature.psi)
    assert value(got, "decision_drift_samples") == DECISIONS
    assert value(got, "decision_drift_reference", model_version=champion.version) == 1
