"""The decision path end to end against real redis-server and real TorchServe replicas."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Sequence

import grpc
import pytest

import core.deadline
import server.front
import server.settings
from core.domain import Side
from decision_client.v1 import decision_pb2, decision_pb2_grpc
from fallback import score_cache
from fallback.score_cache import CachedScore, ScoreCache, ScoreEntry
from feature_cache.mirror import FeatureMirror
from server import redis_clients
from tests.conftest import restart_all
from tests.server.conftest import (
    MirroredFeatureWriter,
    buy,
    decision_stub,
    replica_settings,
    sample_record,
    settle,
    slowed,
)

pytestmark = [pytest.mark.integration, pytest.mark.timed]
# The decision path runs against the same replicas through either inference API.
PROTOCOLS = pytest.mark.parametrize("protocol", ["torchserve", "torchserve-oip"])


# A host stall of tens of ms (these shared 2-core machines) can make a call miss its 50 ms
# deadline whatever the server does: the deadline tests count such calls and bound them
# rather than fail on the first (CI, 2026-11-29: one call in each of two tests).
MAX_LATE_CALLS = 2
MAX_LATE_SHARE = 0.1
TIGHT_DEADLINE_S = 0.050


async def decide_or_late(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub,
) -> decision_pb2.DecideResponse | None:
    """The answer to a call with a 50 ms deadline, or None when the deadline passed first."""
    try:
        return await stub.Decide(buy(), timeout=TIGHT_DEADLINE_S)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        return None


async def answered_in_time(
    stub: decision_pb2_grpc.DecisionServiceAsyncStub, late: list[None]
) -> decision_pb2.DecideResponse:
    """The first of a few 50 ms calls answered before its deadline; the late are counted."""
    while (response := await decide_or_late(stub)) is None:
        late.append(None)
        assert len(late) <= MAX_LATE_CALLS, f"{len(late)} calls past their deadline"
    return response


@PROTOCOLS
async def test_normal_path_is_answered_by_the_primary(
    protocol, replicas, model_store, start_app, channel_to, feature_writer: MirroredFeatureWriter
):
    app = await start_app(torchserve=replica_settings(replicas, protocol=protocol))
    # Written once the server runs: its start (the shipper's first try of the store
    # included) takes over a second on a busy machine, and the age asserted is the read's.
    await feature_writer.write_many([sample_record("BTC-USD")])
    stub = decision_stub(channel_to(app))

    response = await stub.Decide(buy(request_id="r-1"), timeout=2.0)

    _, archive = model_store
    assert response.source == decision_pb2.SOURCE_PRIMARY, response.reason
    assert response.model_version == archive.version
    assert response.model_name == "champion"
    assert response.request_id == "r-1"
    assert response.decision in (decision_pb2.DECISION_TRADE, decision_pb2.DECISION_NO_TRADE)
    assert response.HasField("score") and 0.0 <= response.score <= 1.0
    expected = (
        decision_pb2.DECISION_TRADE
        if response.score >= response.threshold
        else decision_pb2.DECISION_NO_TRADE
    )
    assert response.decision == expected
    assert response.reason.startswith("primary answered in")
    assert response.reason_code == decision_pb2.REASON_CODE_MODEL_ANSWERED
    assert 0 <= response.feature_age_ms < 1000
    assert response.timings.total_us >= response.timings.model_us > 0
    assert response.decision_id


@PROTOCOLS
async def test_primary_killed_is_answered_by_the_secondary(
    protocol, replicas, start_app, channel_to, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    app = await start_app(torchserve=replica_settings(replicas, protocol=protocol))
    stub = decision_stub(channel_to(app))
    last = await stub.Decide(buy(), timeout=2.0)
    assert last.source == decision_pb2.SOURCE_PRIMARY, last.reason

    replicas["primary"].proc.kill()
    try:
        response = await stub.Decide(buy(), timeout=2.0)
        assert response.source == decision_pb2.SOURCE_SECONDARY
        assert response.reason.startswith("primary unavailable")
        assert "secondary answered in" in response.reason
        assert response.reason_code == decision_pb2.REASON_CODE_MODEL_ANSWERED
        assert response.model_version
    finally:
        replicas["primary"].restart()


async def test_paused_primary_is_answered_before_a_50ms_deadline_then_its_breaker_opens_and_closes(
    replicas, start_app, channel_to, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    app = await start_app(
        # The cap holds for both calls: 15 ms for the paused primary leaves the secondary
        # about 20 ms of the 38 that the 12 ms response margin leaves of 50 (less the
        # reserve and the way in), room for a busy 2-core machine.
        torchserve=replica_settings(replicas),
        deadline={"model_call_ms": 15.0},
        breaker={"fail_max": 3, "reset_timeout_s": 1.0},
    )
    stub = decision_stub(channel_to(app))
    await settle(app)
    assert app.replicas[0].breaker.state == "closed"

    primary = replicas["primary"]
    primary.proc.pause()
    try:
        # fail_max (3) counted timeouts open the breaker. A timeout counts only if the
        # replica had MIN_COUNTED_TIMEOUT_MS of it, and timeouts of calls in flight
        # together count once, so on a busy machine a call or two more may be needed.
        calls = 0
        late: list[None] = []
        while app.replicas[0].breaker.state == "closed":
            assert calls < 10, "10 timeouts of the paused primary left its breaker closed"
            # Answered at all is answered in time: the call's own deadline is 50 ms.
            response = await answered_in_time(stub, late)
            calls += 1
            # The one retry goes to the secondary, which answers in the ~20 ms left; when a
            # stall of the host makes it late or leaves it no time (CI, 2026-11-27, and
            # twice in three calls on 2026-11-30), the ladder answers, still in time.
            assert response.source != decision_pb2.SOURCE_PRIMARY, response.reason
            assert "primary deadline exceeded" in response.reason
            assert "secondary" in response.reason, response.reason
            if calls < 3:
                assert app.replicas[0].breaker.state == "closed", f"open after {calls} call(s)"
        assert app.replicas[0].breaker.state == "open"

        # Open, the breaker spends none of the budget on the primary: the secondary has it
        # all and answers.
        response = await answered_in_time(stub, late)
        assert response.source == decision_pb2.SOURCE_SECONDARY
        assert response.reason.startswith("primary breaker open; secondary answered in")
        assert response.timings.model_us < 20_000  # no time spent waiting on the primary
    finally:
        primary.proc.resume()

    # After the reset timeout (1 s) the next call is the half-open trial; the breaker's
    # probe may have made that trial already against the JVM still working off its queue
    # and reopened it for another second (CI, 2026-11-30), so: within three.
    await asyncio.sleep(1.1)
    deadline = time.monotonic() + 2.0
    while not app.replicas[0].breaker.allows_call():
        assert time.monotonic() < deadline, "the open breaker never let a trial call through"
        await asyncio.sleep(0.05)
    # A resumed JVM first works off what queued while it was stopped, so a trial may
    # still fail and reopen the breaker for another reset timeout; it must close soon,
    # after success_threshold successful trials.
    deadline = time.monotonic() + 10
    while app.replicas[0].breaker.state != "closed":
        response = await stub.Decide(buy(), timeout=2.0)
        assert time.monotonic() < deadline, response.reason
        await asyncio.sleep(0.02 if response.source == decision_pb2.SOURCE_PRIMARY else 0.2)
    # Closed, the primary answers again: soon, not at once, as a resumed JVM's calls can
    # still take more than the 15 ms cap for a while on a slow hour (CI, 2026-11-27: 14.9
    # ms; 2026-11-29: five calls in a row), and the breaker may open once more meanwhile.
    sources: list[int] = []
    while decision_pb2.SOURCE_PRIMARY not in sources:
        assert time.monotonic() < deadline + 10, sources[-10:]
        sources.append((await stub.Decide(buy(), timeout=2.0)).source)
        await asyncio.sleep(0.05)


async def test_a_primary_missing_half_its_calls_is_isolated_by_its_failure_rate(
    replicas, start_app, channel_to, feature_writer
):
    """Held off the CPU 60 ms of every 120 (``decisionctl chaos slow``), the primary
    misses about half its calls with successes between them: the consecutive count never
    reaches fail_max (set out of reach here), the failure rate opens the breaker."""
    await feature_writer.write_many([sample_record("BTC-USD")])
    app = await start_app(
        torchserve=replica_settings(replicas),
        # A 15 ms cap (as the paused-primary test): a call caught in a stop times out, and
        # counts, rather than answering slowly once the primary runs again.
        deadline={"model_call_ms": 15.0},
        breaker={"fail_max": 1000, "reset_timeout_s": 60.0},
    )
    stub = decision_stub(channel_to(app))
    await settle(app)
    breaker = app.replicas[0].breaker
    answers: list[decision_pb2.DecideResponse] = []
    late: list[None] = []

    async def caller(until: float) -> None:  # about 25 Decide/s each
        while breaker.state == "closed" and time.monotonic() < until:
            if response := await decide_or_late(stub):
                answers.append(response)
            else:
                late.append(None)
            await asyncio.sleep(0.04)

    async with slowed([replicas["primary"].proc], stopped_ms=60, running_ms=60):
        until = time.monotonic() + 20
        await asyncio.gather(*(caller(until) for _ in range(4)))
        seen = f"{breaker.rates()} after {len(answers)} calls answered, {len(late)} late"
        assert breaker.state == "open", seen
        assert len(late) <= MAX_LATE_SHARE * (len(answers) + len(late)), seen
        primary = sum(a.source == decision_pb2.SOURCE_PRIMARY for a in answers)
        assert 0 < primary < len(answers), seen  # successes came between the failures
        # Open, the secondary answers without waiting on the primary.
        response = await answered_in_time(stub, [])
    assert response.source == decision_pb2.SOURCE_SECONDARY, response.reason
    assert response.reason.startswith("primary breaker open"), response.reason
    assert response.timings.model_us < 20_000


async def wait_for_cached_score(
    cache: ScoreCache, symbol: str, side: Side, *, newer_than_us: int = 0
) -> CachedScore:
    """The cached-score write follows the response; poll for it rather than guess."""
    deadline = time.monotonic() + 5
    while True:
        (cached,) = await cache.get_many([(symbol, side)])
        if cached is not None and cached.scored_at_us > newer_than_us:
            return cached
        assert time.monotonic() < deadline, "no cached score written"
        await asyncio.sleep(0.01)


async def test_both_replicas_down_falls_back_to_cached_score_then_rules_then_abstain(
    replicas, start_app, channel_to, feature_writer, redis_client, key_prefix, monkeypatch
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    # Every decision reads the cached score from Redis (none held in memory): this test
    # moves it there and expects the next decision to see it.
    monkeypatch.setattr(score_cache, "HELD_MS", 0.0)
    app = await start_app(
        torchserve=replica_settings(replicas), fallback={"cached_score_max_age_ms": 1000.0}
    )
    stub = decision_stub(channel_to(app))
    good = await stub.Decide(buy(), timeout=2.0)
    assert good.source == decision_pb2.SOURCE_PRIMARY
    cache = ScoreCache(redis_client, key_prefix=key_prefix, ttl_ms=60_000)
    remembered = await wait_for_cached_score(cache, "BTC-USD", Side.BUY)
    assert remembered.score == pytest.approx(good.score)

    for replica in replicas.values():
        replica.proc.kill()
    try:
        # Re-date the remembered score: the kills above may take a while.
        now_us = time.time_ns() // 1000
        fresh = dataclasses.replace(remembered, scored_at_us=now_us - 100_000)
        await cache.put_many([ScoreEntry("BTC-USD", Side.BUY, fresh)])
        await feature_writer.write_many([sample_record("BTC-USD", offset=2)])
        cached = await stub.Decide(buy(), timeout=2.0)
        assert cached.source == decision_pb2.SOURCE_CACHED_SCORE, cached.reason
        assert cached.score == pytest.approx(good.score)
        assert cached.model_version == good.model_version
        assert re.match(
            r"primary (unavailable|deadline exceeded) after [\d.]+ ms.*; "
            r"secondary (unavailable|deadline exceeded) after [\d.]+ ms.*; "
            r"cached score \d+ ms old$",
            cached.reason,
        ), cached.reason
        assert cached.reason_code in (
            decision_pb2.REASON_CODE_MODEL_UNAVAILABLE,
            decision_pb2.REASON_CODE_MODEL_TIMEOUT,
        )

        old = dataclasses.replace(remembered, scored_at_us=now_us - 3_000_000)
        await cache.put_many([ScoreEntry("BTC-USD", Side.BUY, old)])
        rules = await stub.Decide(buy(), timeout=2.0)
        assert rules.source == decision_pb2.SOURCE_RULES
        assert re.search(r"; cached score 3\d{3} ms old \(max 1000\); rules: ", rules.reason)
        assert "rules: book leans +0.25 toward buy" in rules.reason
        assert rules.decision == decision_pb2.DECISION_TRADE
        assert rules.model_name == "rules"
        assert len(rules.model_version) == 64
        assert rules.model_version != cached.model_version

        missing = await stub.Decide(buy("ETH-USD"), timeout=2.0)
        assert missing.source == decision_pb2.SOURCE_ABSTAIN
        assert missing.decision == decision_pb2.DECISION_ABSTAIN
        assert not missing.HasField("score")
        assert "no features for ETH-USD" in missing.reason
        assert missing.reason_code == decision_pb2.REASON_CODE_NO_FEATURES
        assert missing.feature_age_ms == -1
        assert (missing.model_name, missing.model_version) == ("fallback", rules.model_version)
    finally:
        restart_all(replicas.values())


async def test_stale_features_skip_the_model(replicas, start_app, channel_to, feature_writer):
    app = await start_app(torchserve=replica_settings(replicas), features={"max_age_ms": 2000})
    await feature_writer.write_many([sample_record("SOL-USD", age_ms=5000)])  # once it runs
    stub = decision_stub(channel_to(app))

    response = await stub.Decide(buy("SOL-USD"), timeout=2.0)

    assert response.source == decision_pb2.SOURCE_ABSTAIN
    assert re.match(r"features stale: 5\d{3} ms old \(max 2000\)", response.reason)
    assert response.reason_code == decision_pb2.REASON_CODE_FEATURES_STALE
    assert response.feature_age_ms >= 5000


@PROTOCOLS
async def test_batch_is_one_model_call_in_request_order(
    protocol, replicas, start_app, channel_to, feature_writer
):
    await feature_writer.write_many(
        [sample_record("BTC-USD"), sample_record("ETH-USD", imbalance_l5=-0.5)]
    )
    app = await start_app(torchserve=replica_settings(replicas, protocol=protocol))
    stub = decision_stub(channel_to(app))
    primary = app.replicas[0].client
    calls: list[int] = []
    predict = primary.predict

    async def counting_predict(rows, timeout_s, **kwargs):
        calls.append(len(rows))
        return await predict(rows, timeout_s, **kwargs)

    primary.predict = counting_predict
    requests = [
        buy("BTC-USD", request_id="a"),
        buy("NOPE-USD", request_id="b"),
        decision_pb2.DecideRequest(
            symbol="ETH-USD", side=decision_pb2.SIDE_SELL, quantity=2, request_id="c"
        ),
    ]

    batch = await stub.DecideBatch(decision_pb2.DecideBatchRequest(requests=requests), timeout=2)

    assert calls == [2]  # one call with the two rows that had features
    assert [r.request_id for r in batch.responses] == ["a", "b", "c"]
    assert [r.source for r in batch.responses] == [
        decision_pb2.SOURCE_PRIMARY,
        decision_pb2.SOURCE_ABSTAIN,
        decision_pb2.SOURCE_PRIMARY,
    ]
    singles = [await stub.Decide(requests[i], timeout=2.0) for i in (0, 2)]
    assert [s.score for s in singles] == pytest.approx(
        [batch.responses[0].score, batch.responses[2].score]
    )


async def test_health_is_serving_only_when_ready_and_reflection_lists_the_service(
    redis_instance, key_prefix, channel_to, tmp_path
):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from core.processes import free_port
    from server.app import DecisionApp
    from tests.server.conftest import make_settings

    # Redis not there yet: the server answers health checks, NOT_SERVING.
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    app = DecisionApp(make_settings(dead_redis, key_prefix, tmp_path / "a"))
    await app.start()
    try:
        channel = channel_to(app)
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "decision.v1.DecisionService"):
            status = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in reflection.ServerReflectionInfo(iter([request]), timeout=1)]
        names = {s.name for s in responses[0].list_services_response.service}
        assert "decision.v1.DecisionService" in names
        assert "grpc.health.v1.Health" in names
    finally:
        await app.stop()

    ready = DecisionApp(make_settings(redis_instance.url, key_prefix, tmp_path / "b"))
    await ready.start()
    try:
        await asyncio.wait_for(ready.wait_ready(), 5)
        health = health_pb2_grpc.HealthStub(channel_to(ready))
        status = await health.Check(
            health_pb2.HealthCheckRequest(service="decision.v1.DecisionService"), timeout=1
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await ready.stop()


async def test_no_caller_deadline_gets_the_default_budget(
    replicas, start_app, channel_to, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    app = await start_app(
        torchserve=replica_settings(replicas), deadline={"default_budget_ms": 30.0}
    )
    stub = decision_stub(channel_to(app))
    replicas["primary"].proc.pause()
    replicas["secondary"].proc.pause()
    try:
        started = time.monotonic()
        response = await stub.Decide(buy())  # no deadline
        assert (time.monotonic() - started) * 1000 < 60
        assert response.source == decision_pb2.SOURCE_RULES
        assert "deadline exceeded" in response.reason
    finally:
        replicas["primary"].proc.resume()
        replicas["secondary"].proc.resume()


async def test_grpc_status_not_internal_for_invalid_argument(start_app, channel_to):
    app = await start_app()
    stub = decision_stub(channel_to(app))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Decide(buy(symbol="btc usd"), timeout=2.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("symbol:")


async def test_timeouts_imposed_by_short_caller_deadlines_do_not_open_the_breaker(
    replicas, start_app, channel_to, feature_writer, monkeypatch
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    # This test is about the breaker; a wide reserve keeps answers inside even the short
    # deadlines when the machine is busy; the margins are fixed so that a 20 ms deadline
    # always leaves a call some time.
    monkeypatch.setattr(server.settings, "FALLBACK_RESERVE_MS", 8.0)
    # Calls given 7 ms must stay well clear of what counts.
    monkeypatch.setattr(core.deadline, "MIN_COUNTED_TIMEOUT_MS", 15.0)
    app = await start_app(
        torchserve=replica_settings(replicas),
        breaker={"fail_max": 2, "reset_timeout_s": 60.0},
        deadline={"model_call_ms": 25.0, "response_margin_ms": 5.0},
    )
    stub = decision_stub(channel_to(app))
    await settle(app)

    replicas["primary"].proc.pause()  # every call to it times out
    try:
        # 20 ms - 5 ms margin - 8 ms reserve: at most 7 ms for the call, too short to blame it.
        # On a busy machine a request can reach the handler with too little left to call
        # at all; such calls do not count toward the five timeouts (nor past the bound of
        # abandoned calls, where a silent replica would be blamed).
        timeouts = 0
        for _ in range(12):
            response = await stub.Decide(buy(), timeout=0.020)
            assert response.source == decision_pb2.SOURCE_RULES, response.reason
            assert response.reason.startswith(("primary deadline exceeded", "primary skipped")), (
                response.reason
            )
            timeouts += response.reason.startswith("primary deadline exceeded")
            if timeouts == 5:
                break
        assert timeouts == 5
        assert app.replicas[0].breaker.state == "closed"

        # 80 ms budget: the primary gets 25 ms and misses them; two that count (at
        # least 15 ms) open the breaker.
        calls = 0
        while app.replicas[0].breaker.state == "closed":
            assert calls < 8, "8 timeouts given 25 ms left the primary's breaker closed"
            response = await stub.Decide(buy(), timeout=0.080)
            calls += 1
            assert response.source == decision_pb2.SOURCE_SECONDARY, response.reason
            assert response.reason.startswith("primary deadline exceeded"), response.reason
            if calls < 2:
                assert app.replicas[0].breaker.state == "closed", "open after one timeout"
        assert app.replicas[0].breaker.state == "open"
    finally:
        replicas["primary"].proc.resume()


async def test_cached_score_is_rewritten_at_most_once_per_interval(
    replicas, start_app, channel_to, feature_writer, redis_client, key_prefix, monkeypatch
):
    # Every write the server starts, counted as it starts (the server runs on this loop).
    writes: list[int] = []
    put_many = ScoreCache.put_many

    async def counted(self: ScoreCache, entries: Sequence[ScoreEntry]) -> None:
        writes.append(len(entries))
        await put_many(self, entries)

    monkeypatch.setattr(ScoreCache, "put_many", counted)
    monkeypatch.setattr(score_cache, "WRITE_INTERVAL_MS", 1000.0)
    await feature_writer.write_many([sample_record("BTC-USD")])
    app = await start_app(torchserve=replica_settings(replicas))
    stub = decision_stub(channel_to(app))
    cache = ScoreCache(redis_client, key_prefix=key_prefix, ttl_ms=60_000)
    await stub.Decide(buy(), timeout=2.0)
    first = (await wait_for_cached_score(cache, "BTC-USD", Side.BUY)).scored_at_us
    await stub.Decide(buy(), timeout=2.0)
    await asyncio.sleep(0.05)  # the write task, had there been one, has started by now
    assert writes == [1]
    (again,) = await cache.get_many([("BTC-USD", Side.BUY)])
    assert again is not None and again.scored_at_us == first
    await asyncio.sleep(1.0)
    await stub.Decide(buy(), timeout=2.0)
    await wait_for_cached_score(cache, "BTC-USD", Side.BUY, newer_than_us=first)
    assert writes == [1, 1]


async def test_more_concurrent_calls_than_redis_connections_all_get_the_model(
    replicas, start_app, channel_to, feature_writer, monkeypatch
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    monkeypatch.setattr(redis_clients, "DECISION_REDIS_CONNECTIONS", 2)
    # Every call reads Redis: with the mirror answering, none would use the pool at all.
    monkeypatch.setattr(FeatureMirror, "lookup", lambda self, symbols: None)
    # About the connection pool, not the queue limit: 40 calls sent at once from this
    # test's loop, which is the server's too, all wait for it to take them.
    monkeypatch.setattr(server.front, "QUEUED_CALLS_MAX", 64)
    monkeypatch.setattr(server.front, "QUEUED_CALLS_SHED", 64)
    app = await start_app(
        torchserve=replica_settings(replicas),
        # 40 calls at once on one connection, past the default stream cap.
        server={"max_concurrent_streams": 64},
    )
    stub = decision_stub(channel_to(app))
    responses = await asyncio.gather(*(stub.Decide(buy(), timeout=5.0) for _ in range(40)))
    sources = {r.source for r in responses}
    assert sources == {decision_pb2.SOURCE_PRIMARY}, {r.reason for r in responses}
    assert app.features.store_reads >= 40
