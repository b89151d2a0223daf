"""The decision path on ``decision-server --workers 2``, as users run it: one server process
whose two workers share the port, reached over several connections (the kernel spreads
connections over the workers), against real Redis and TorchServe. Each test makes every
connection show the behaviour, and the audit store shows that both workers decided."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import grpc
import pytest
import sqlalchemy as sa

from core.domain import Side
from decision_client.v1 import decision_pb2
from fallback.score_cache import HELD_MS, ScoreCache, ScoreEntry
from server.audit.store import decisions
from tests.conftest import restart_all
from tests.server.admin.test_admin import store_rows
from tests.server.conftest import (
    DecisionStubs,
    ServerProcess,
    buy,
    sample_record,
    worker_connections,
)
from tests.server.test_decision_path import wait_for_cached_score

pytestmark = [pytest.mark.integration, pytest.mark.timed]


async def answers(
    stubs: DecisionStubs, request: decision_pb2.DecideRequest, timeout_s: float = 2.0
):
    return [await stub.Decide(request, timeout=timeout_s) for stub in stubs]


async def stop_and_read_servers(server: ServerProcess, ids: set[str]) -> set[str]:
    """Stops the server (SIGTERM: both workers ship their journals); the worker ids
    that recorded ``ids``, all of which must be in the store."""
    await server.close()
    assert server.proc.wait(0) == 0
    statement = sa.select(decisions.c.decision_id, decisions.c.server_id)
    rows = store_rows(server.run_dir.parent / "audit.db", statement)
    assert ids <= {row.decision_id for row in rows}
    return {row.server_id.rsplit("/", 1)[-1] for row in rows if row.decision_id in ids}


async def test_every_worker_decides_validates_and_batches(
    server_processes: Callable[..., list[ServerProcess]], feature_writer, model_store
):
    await feature_writer.write_many([sample_record("BTC-USD"), sample_record("ETH-USD")])
    (server,) = server_processes(1, workers=2)
    _, archive = model_store
    ids: set[str] = set()
    async with worker_connections(server) as stubs:
        for answer in await answers(stubs, buy()):
            assert answer.source == decision_pb2.SOURCE_PRIMARY, answer.reason
            assert answer.model_version == archive.version
            ids.add(answer.decision_id)
        batch = decision_pb2.DecideBatchRequest(
            requests=[buy("ETH-USD", request_id="a"), buy("BTC-USD", request_id="b")]
        )
        for stub in stubs:
            response = await stub.DecideBatch(batch, timeout=2.0)
            assert [r.request_id for r in response.responses] == ["a", "b"]
            assert {r.source for r in response.responses} == {decision_pb2.SOURCE_PRIMARY}
            ids |= {r.decision_id for r in response.responses}
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.Decide(buy(quantity=-1.0), timeout=2.0)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "quantity" in (bad.value.details() or "")
    assert await stop_and_read_servers(server, ids) == {"w0", "w1"}


async def test_every_worker_falls_back_to_the_secondary_then_the_ladder(
    server_processes, replicas, feature_writer, redis_client, key_prefix
):
    await feature_writer.write_many([sample_record("BTC-USD"), sample_record("SOL-USD")])
    (server,) = server_processes(1, workers=2)
    ids: set[str] = set()
    cache = ScoreCache(redis_client, key_prefix=key_prefix, ttl_ms=60_000)
    async with worker_connections(server) as stubs:
        good = await answers(stubs, buy())
        assert {a.source for a in good} == {decision_pb2.SOURCE_PRIMARY}
        remembered = await wait_for_cached_score(cache, "BTC-USD", Side.BUY)
        replicas["primary"].proc.kill()
        try:
            for answer in await answers(stubs, buy()):
                assert answer.source == decision_pb2.SOURCE_SECONDARY, answer.reason
                # Each worker's breaker opens after its fifth failed call.
                assert answer.reason.startswith(("primary unavailable", "primary breaker open"))
                ids.add(answer.decision_id)
            replicas["secondary"].proc.kill()
            now_us = time.time_ns() // 1000
            fresh = dataclasses.replace(remembered, scored_at_us=now_us - 100_000)
            await cache.put_many([ScoreEntry("BTC-USD", Side.BUY, fresh)])
            await asyncio.sleep(HELD_MS / 1000.0)  # past what a worker holds in memory
            for answer in await answers(stubs, buy()):
                assert answer.source == decision_pb2.SOURCE_CACHED_SCORE, answer.reason
                assert answer.score == pytest.approx(remembered.score)
                ids.add(answer.decision_id)
            old = dataclasses.replace(remembered, scored_at_us=now_us - 3_000_000)
            await cache.put_many([ScoreEntry("BTC-USD", Side.BUY, old)])
            await asyncio.sleep(HELD_MS / 1000.0)
            for answer in await answers(stubs, buy()):
                assert answer.source == decision_pb2.SOURCE_RULES, answer.reason
                ids.add(answer.decision_id)
            for answer in await answers(stubs, buy("ETH-USD")):  # no features at all
                assert answer.source == decision_pb2.SOURCE_ABSTAIN, answer.reason
                assert "no features for ETH-USD" in answer.reason
                ids.add(answer.decision_id)
        finally:
            restart_all(replicas.values())
    assert await stop_and_read_servers(server, ids) == {"w0", "w1"}


async def test_every_workers_breaker_opens_on_a_paused_primary_and_closes_after(
    server_processes, replicas, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    (server,) = server_processes(
        1,
        workers=2,
        DECISION_DEADLINE__MODEL_CALL_MS="20",
        DECISION_BREAKER__FAIL_MAX="3",
        # Long enough that no breaker turns half-open while the test is still opening
        # the others (each trial would wait on the paused primary).
        DECISION_BREAKER__RESET_TIMEOUT_S="3",
    )
    ids: set[str] = set()
    primary = replicas["primary"]
    async with worker_connections(server) as stubs:

        async def all_primary() -> bool:
            sources = {a.source for a in await answers(stubs, buy())}
            return sources == {decision_pb2.SOURCE_PRIMARY}

        # Every worker's primary is warm: a host stall can make one call late (CI,
        # 2026-11-27: the loop stalled 19.8 ms of a 48 ms call), so until all answer.
        deadline = time.monotonic() + 15
        while not await all_primary():
            assert time.monotonic() < deadline, "a worker's primary never answered"
            await asyncio.sleep(0.2)
        primary.proc.pause()
        try:
            # Each connection's worker sees three primary timeouts, then an open breaker.
            # (The 50 ms deadline itself is test_decision_path's: here the deadline only
            # has to hold the 20 ms primary wait and the secondary on a busy machine.)
            for _ in range(3):
                for stub in stubs:
                    answer = await stub.Decide(buy(), timeout=0.2)
                    # The secondary answers, or, on a machine busy enough that it is late
                    # too, the ladder does: the primary is never the one.
                    assert answer.source != decision_pb2.SOURCE_PRIMARY, answer.reason
                    assert answer.reason.startswith("primary"), answer.reason
                    assert "secondary" in answer.reason, answer.reason
                    ids.add(answer.decision_id)
            for answer in await answers(stubs, buy(), timeout_s=0.2):
                assert answer.reason.startswith("primary breaker open"), answer.reason
                ids.add(answer.decision_id)
        finally:
            primary.proc.resume()

        deadline = time.monotonic() + 15
        while not await all_primary():  # every worker's breaker closed again
            assert time.monotonic() < deadline, "a worker's breaker did not close"
            await asyncio.sleep(0.2)
    assert await stop_and_read_servers(server, ids) == {"w0", "w1"}
