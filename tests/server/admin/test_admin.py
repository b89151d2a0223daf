"""AdminService end to end: two real decision server processes sharing one redis-server,
real TorchServe replicas, tokens and roles, admin audit rows, canary rollback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import server.app
from decision_client.v1 import admin_pb2, admin_pb2_grpc, decision_pb2
from feature_cache.schema import MODEL_INPUT_WIDTH
from server.admin import ctl
from server.app import DecisionApp
from server.audit.store import admin_actions, create_store_engine, decisions
from server.control import canary as canary_module
from server.control import flags
from server.shadow import ShadowScorer
from tests.conftest import REPO, wait_for
from tests.server.conftest import (
    OPERATOR,
    OPERATOR_TOKEN,
    TOKENS,
    VIEWER,
    VIEWER_TOKEN,
    ServerProcess,
    bearer,
    buy,
    close_all,
    decision_stub,
    replica_settings,
    sample_record,
    settle,
    worker_connections,
)

# Tests with a bound in time (a change seen within a second, a canary judged on its latency,
# top through a stall) are `timed`; the rest run beside others.
pytestmark = pytest.mark.integration


async def decide_until(
    server: ServerProcess, symbol: str, done: Callable[[decision_pb2.DecideResponse], bool]
) -> tuple[decision_pb2.DecideResponse, float]:
    """Decides every 20 ms until ``done``; the answer and the seconds it took (max 10)."""
    started = time.monotonic()
    while True:
        response = await server.decisions.Decide(buy(symbol), timeout=2.0)
        if done(response):
            return response, time.monotonic() - started
        assert time.monotonic() - started < 10, response.reason
        await asyncio.sleep(0.02)


ADMIN_ROWS = sa.select(admin_actions).order_by(admin_actions.c.at)


def store_rows(database: Path, statement: sa.Executable) -> list[sa.Row[Any]]:
    if not database.exists():  # the shipper has not created the store yet
        return []
    engine = create_store_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as conn:
            return list(conn.execute(statement))
    except sa.exc.OperationalError as exc:
        if "no such table" in str(exc):  # nor migrated it yet
            return []
        raise
    finally:
        engine.dispose()


async def wait_store_rows(
    database: Path, count: int, statement: sa.Executable = ADMIN_ROWS
) -> list[sa.Row[Any]]:
    """The rows ``statement`` selects, once there are ``count`` (admin rows by default)."""
    deadline = time.monotonic() + 10
    while True:
        rows = store_rows(database, statement)
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"{len(rows)} rows, expected {count}"
        await asyncio.sleep(0.1)


@pytest.mark.timed
async def test_breaker_override_reaches_the_other_server_within_a_second_and_expires(
    server_processes, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    a, b = server_processes(2)
    try:
        for server in (a, b):
            response = await server.decisions.Decide(buy(), timeout=2.0)
            assert response.source == decision_pb2.SOURCE_PRIMARY, response.reason

        answer = await a.admin.SetBreaker(
            admin_pb2.SetBreakerRequest(
                replica="primary",
                mode=admin_pb2.BREAKER_MODE_FORCE_OPEN,
                reason="drill: primary replica misbehaving",
                ttl_s=3.0,
            ),
            metadata=OPERATOR,
            timeout=5.0,
        )
        set_at = time.monotonic()
        assert answer.before == admin_pb2.BREAKER_MODE_AUTO
        assert answer.after == admin_pb2.BREAKER_MODE_FORCE_OPEN
        assert answer.HasField("expires_at")

        # The server that took the change applies it at once; the other within a second.
        response = await a.decisions.Decide(buy(), timeout=2.0)
        assert response.source == decision_pb2.SOURCE_SECONDARY, response.reason
        response, took_s = await decide_until(
            b, "BTC-USD", lambda r: r.source == decision_pb2.SOURCE_SECONDARY
        )
        assert time.monotonic() - set_at < 1.0, f"server b took {took_s:.2f} s"
        assert response.reason.startswith("primary forced open by on-call")

        status = await b.admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=VIEWER)
        (primary,) = [r for r in status.replicas if r.name == "primary"]
        assert primary.mode == admin_pb2.BREAKER_MODE_FORCE_OPEN
        assert primary.override.changed_by == "oncall"
        assert status.shared_state.in_sync
        # The fleet list says forced open too, not the idle breaker's "closed".
        deadline = time.monotonic() + 1.5  # entries are rewritten every second
        while True:
            fleet = await b.admin.ListServers(admin_pb2.ListServersRequest(), metadata=VIEWER)
            shown = sorted(s.breakers["primary"] for s in fleet.servers)
            if shown == ["force-open", "force-open"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert shown == ["force-open", "force-open"]

        # The TTL ends the override on both servers by itself.
        for server in (a, b):
            response, _ = await decide_until(
                server, "BTC-USD", lambda r: r.source == decision_pb2.SOURCE_PRIMARY
            )
        elapsed_s = time.monotonic() - set_at
        assert 2.5 < elapsed_s < 4.5, elapsed_s
        status = await b.admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=VIEWER)
        (primary,) = [r for r in status.replicas if r.name == "primary"]
        assert primary.mode == admin_pb2.BREAKER_MODE_AUTO
    finally:
        await close_all(a, b)

    (row,) = await wait_store_rows(a.run_dir.parent / "audit.db", 1)
    assert (row.actor, row.action, row.target) == ("oncall", "set_breaker", "primary")
    assert row.before["mode"] == "AUTO"
    assert row.after["mode"] == "FORCE_OPEN"
    assert row.reason == "drill: primary replica misbehaving"


@pytest.mark.timed
async def test_kill_switch_for_one_symbol_abstains_only_that_symbol_on_every_server(
    server_processes, feature_writer
):
    for symbol in ("BTC-USD", "ETH-USD"):
        await feature_writer.write_many([sample_record(symbol)])
    a, b = server_processes(2)
    try:
        await a.admin.KillSwitch(
            admin_pb2.KillSwitchRequest(scope="ETH-USD", engaged=True, reason="bad prints"),
            metadata=OPERATOR,
            timeout=5.0,
        )
        response, took_s = await decide_until(
            b, "ETH-USD", lambda r: r.decision == decision_pb2.DECISION_ABSTAIN
        )
        assert took_s < 1.0
        assert response.source == decision_pb2.SOURCE_ABSTAIN
        assert response.reason == "kill switch for ETH-USD engaged by oncall: bad prints"
        assert response.reason_code == decision_pb2.REASON_CODE_KILL_SWITCH
        for server in (a, b):
            other = await server.decisions.Decide(buy("BTC-USD"), timeout=2.0)
            assert other.source == decision_pb2.SOURCE_PRIMARY, other.reason

        await b.admin.KillSwitch(
            admin_pb2.KillSwitchRequest(scope="ETH-USD", engaged=False, reason="prints fixed"),
            metadata=OPERATOR,
            timeout=5.0,
        )
        _, took_s = await decide_until(
            a, "ETH-USD", lambda r: r.source == decision_pb2.SOURCE_PRIMARY
        )
        assert took_s < 1.0
    finally:
        await close_all(a, b)


@pytest.mark.timed
async def test_a_kill_switch_through_one_worker_reaches_every_worker_of_the_server(
    server_processes, feature_writer
):
    """``--workers 2``: connections spread over both workers, an admin call reaches one
    of them, and every worker stops deciding the symbol; SIGTERM stops both, and every
    decision either made is in the audit store under its own server id."""
    await feature_writer.write_many([sample_record("ETH-USD")])
    (server,) = server_processes(1, workers=2)
    ids: set[str] = set()
    try:
        # A connection of its own per channel: the kernel spreads connections over workers.
        async with worker_connections(server) as stubs:
            for stub in stubs:
                answer = await stub.Decide(buy("ETH-USD"), timeout=2.0)
                assert answer.source == decision_pb2.SOURCE_PRIMARY, answer.reason
                ids.add(answer.decision_id)
            await server.admin.KillSwitch(
                admin_pb2.KillSwitchRequest(scope="ETH-USD", engaged=True, reason="bad prints"),
                metadata=OPERATOR,
                timeout=5.0,
            )
            deadline = time.monotonic() + 1.0
            for stub in stubs:  # every connection, whichever worker it reached
                while True:
                    answer = await stub.Decide(buy("ETH-USD"), timeout=2.0)
                    ids.add(answer.decision_id)
                    if answer.source == decision_pb2.SOURCE_ABSTAIN:
                        break
                    assert time.monotonic() < deadline, answer.reason
                    await asyncio.sleep(0.02)
    finally:
        await server.close()  # SIGTERM: both workers drain their journals
    assert server.proc.wait(0) == 0  # a clean stop, workers included
    statement = sa.select(decisions.c.decision_id, decisions.c.server_id)
    rows = store_rows(server.run_dir.parent / "audit.db", statement)
    assert ids <= {row.decision_id for row in rows}
    assert {row.server_id.rsplit("/", 1)[-1] for row in rows} == {"w0", "w1"}


@pytest.fixture
async def admin_app(start_app, replicas) -> DecisionApp:
    app: DecisionApp = await start_app(
        torchserve=replica_settings(replicas), admin={"tokens": TOKENS}
    )
    # The store's tables exist once the shipper's process has migrated it and said so
    # (until then history answers UNAVAILABLE, as it would with the store away).
    await asyncio.to_thread(wait_for, lambda: app.audit.shipper.store_ok, 10)
    return app


async def test_changes_need_an_operator_token_and_each_accepted_one_is_audited(admin_app):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{admin_app.admin_port}")
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    change = admin_pb2.SetFlagRequest(name="shadow_sample_rate", value="0.5", reason="compare")
    try:
        for metadata, code in (
            ([], grpc.StatusCode.UNAUTHENTICATED),
            (bearer("not-a-known-token-at-all"), grpc.StatusCode.UNAUTHENTICATED),
            ([("authorization", OPERATOR_TOKEN)], grpc.StatusCode.UNAUTHENTICATED),
            (VIEWER, grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.SetFlag(change, metadata=metadata, timeout=5.0)
            assert err.value.code() == code, err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5.0)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Server reflection (a streaming method) on the admin port needs a token too.
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in reflect.ServerReflectionInfo(iter([listing]), timeout=5.0):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = [
            answer
            async for answer in reflect.ServerReflectionInfo(
                iter([listing]), metadata=VIEWER, timeout=5.0
            )
        ]
        assert len(answers) == 1
        names = {s.name for s in answers[0].list_services_response.service}
        assert "decision.v1.AdminService" in names
        assert "dashboard (viewer) may not call SetFlag" in (
            await _details(admin.SetFlag(change, metadata=VIEWER, timeout=5.0))
        )

        # Bad values name the field; nothing is changed or audited.
        for request, field in (
            (admin_pb2.SetFlagRequest(name="nope", value="1", reason="x"), "name"),
            (admin_pb2.SetFlagRequest(name="shadow_sample_rate", value="2", reason="x"), "value"),
            (admin_pb2.SetFlagRequest(name="shadow_sample_rate", value="0.1"), "reason"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.SetFlag(request, metadata=OPERATOR, timeout=5.0)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith(f"{field}:")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.KillSwitch(
                admin_pb2.KillSwitchRequest(scope="btc usd", engaged=True, reason="x"),
                metadata=OPERATOR,
            )
        assert (err.value.details() or "").startswith("scope:")
        # A reason that would forge lines and colours in status, history and Decide.
        forged = "line1\nkill switches\n  (none engaged)\x1b[31mRED\x1b[0m"
        for reason in (forged, "ok \u202e reversed"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.KillSwitch(
                    admin_pb2.KillSwitchRequest(scope="SOL-USD", engaged=True, reason=reason),
                    metadata=OPERATOR,
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith(
                "reason: must be one line of printable text: character "
            ), err.value.details()
        status = await admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=VIEWER)
        assert list(status.kill_switches) == []

        # Viewers read; operators change, and every change is one audit row.
        listed = await admin.ListFlags(admin_pb2.ListFlagsRequest(), metadata=VIEWER)
        assert {f.name for f in listed.flags} == {"shadow_sample_rate", "canary_auto_rollback"}
        flag = await admin.SetFlag(change, metadata=OPERATOR, timeout=5.0)
        assert (flag.before.value, flag.after.value) == ("0.0", "0.5")
        await admin.SetFlag(
            admin_pb2.SetFlagRequest(name="shadow_sample_rate", reset=True, reason="done"),
            metadata=OPERATOR,
            timeout=5.0,
        )
        await admin.SetBreaker(
            admin_pb2.SetBreakerRequest(
                replica="secondary", mode=admin_pb2.BREAKER_MODE_FORCE_CLOSED, reason="trust it"
            ),
            metadata=OPERATOR,
            timeout=5.0,
        )
        status = await admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=VIEWER)
        assert {f.name: f.value for f in status.flags}["shadow_sample_rate"] == "0.0"
        assert [r.mode for r in status.replicas] == [
            admin_pb2.BREAKER_MODE_AUTO,
            admin_pb2.BREAKER_MODE_FORCE_CLOSED,
        ]
        mirror = status.feature_mirror
        assert (mirror.enabled, mirror.live, mirror.losses) == (True, True, 0)
    finally:
        await channel.close()

    rows = await wait_store_rows(Path(admin_app.settings.audit.journal_dir).parent / "audit.db", 3)
    assert [(r.actor, r.action, r.target) for r in rows] == [
        ("oncall", "set_flag", "shadow_sample_rate"),
        ("oncall", "reset_flag", "shadow_sample_rate"),
        ("oncall", "set_breaker", "secondary"),
    ]
    assert rows[0].before["value"] == "0.0" and rows[0].after["value"] == "0.5"
    assert rows[1].before["changed_by"] == "oncall"


async def test_history_lists_every_change_newest_first_and_decisionctl_shows_it(
    admin_app, tmp_path, capsys
):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{admin_app.admin_port}")
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    try:
        await admin.SetBreaker(
            admin_pb2.SetBreakerRequest(
                replica="primary", mode=admin_pb2.BREAKER_MODE_FORCE_OPEN, reason="INC-7 OOM"
            ),
            metadata=OPERATOR,
            timeout=5.0,
        )
        await admin.KillSwitch(
            admin_pb2.KillSwitchRequest(scope="ETH-USD", engaged=True, reason="halted"),
            metadata=OPERATOR,
            timeout=5.0,
        )
        everything = admin_pb2.ListAdminActionsRequest()
        deadline = time.monotonic() + 10
        while len((await admin.ListAdminActions(everything, metadata=VIEWER)).actions) < 2:
            assert time.monotonic() < deadline, "the changes never reached the store"
            await asyncio.sleep(0.1)
        listed = (await admin.ListAdminActions(everything, metadata=VIEWER)).actions
        assert [(a.actor, a.action, a.target, a.reason) for a in listed] == [
            ("oncall", "engage_kill_switch", "ETH-USD", "halted"),
            ("oncall", "set_breaker", "primary", "INC-7 OOM"),
        ]
        assert listed[0].at.ToMicroseconds() >= listed[1].at.ToMicroseconds()
        assert '"mode":"FORCE_OPEN"' in listed[1].after_json.replace(" ", "")

        only = admin_pb2.ListAdminActionsRequest(target="primary")
        assert [
            a.target for a in (await admin.ListAdminActions(only, metadata=VIEWER)).actions
        ] == ["primary"]
        later = admin_pb2.ListAdminActionsRequest(since=listed[0].at, limit=1)
        assert [
            a.target for a in (await admin.ListAdminActions(later, metadata=VIEWER)).actions
        ] == ["ETH-USD"]
        nobody = admin_pb2.ListAdminActionsRequest(actor="someone-else")
        assert not (await admin.ListAdminActions(nobody, metadata=VIEWER)).actions
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.ListAdminActions(
                admin_pb2.ListAdminActionsRequest(limit=5000), metadata=VIEWER, timeout=5.0
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("limit: ")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.ListAdminActions(everything, timeout=5.0)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()

    token_file = tmp_path / "token"
    token_file.write_text(VIEWER_TOKEN)
    address = f"127.0.0.1:{admin_app.admin_port}"
    argv = ["history", "--since", "10m", "--address", address, "--token-file", str(token_file)]
    assert await asyncio.to_thread(ctl.main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["AT", "ACTOR", "ACTION", "TARGET", "CHANGE", "REASON"]
    assert "engage_kill_switch" in lines[1] and "ETH-USD" in lines[1]
    assert "set_breaker" in lines[2] and "mode AUTO -> FORCE_OPEN" in lines[2]
    assert lines[2].rstrip().endswith("INC-7 OOM")


async def _details(call: object) -> str:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.details() or ""
    raise AssertionError("the call succeeded")


@pytest.fixture
async def canary_app(start_app, replicas, challenger_replica, monkeypatch) -> DecisionApp:
    challenger_replica.ensure_running()
    # A short window and sample so that the test runs in seconds. Every decision here has
    # the same features, so each model gives one score: the PSI is evaluated (a promotion
    # waits for it) but its limit, for score distributions, is tested in test_canary.py.
    # The good canary must not be judged on this machine's latency noise: the p99 of
    # a few dozen calls is their slowest one, and one call a host stall pushes past the
    # model deadline must stay under the error-rate limit (+5 %): 1 in 10 would not.
    monkeypatch.setattr(canary_module, "MIN_DECISIONS", 25)
    monkeypatch.setattr(canary_module, "PSI_MIN_SCORES", 10)
    monkeypatch.setattr(canary_module, "MAX_SCORE_PSI", math.inf)
    monkeypatch.setattr(canary_module, "WINDOW_S", 10.0)
    monkeypatch.setattr(canary_module, "P99_SLACK_MS", 50.0)
    app: DecisionApp = await start_app(
        torchserve={
            **replica_settings(replicas),
            "challenger_address": challenger_replica.address,
        },
        deadline={"model_call_ms": 60.0},
        admin={"tokens": TOKENS},
        canary={"max_p99_ratio": 10.0},
    )
    await settle(app)
    return app


async def set_canary(app: DecisionApp, weight: float) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as channel:
        await admin_pb2_grpc.AdminServiceStub(channel).SetCanary(
            admin_pb2.SetCanaryRequest(weight=weight, reason="canary test"),
            metadata=OPERATOR,
            timeout=5.0,
        )


async def get_status(app: DecisionApp) -> admin_pb2.GetStatusResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as channel:
        return await admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
            admin_pb2.GetStatusRequest(), metadata=VIEWER, timeout=5.0
        )


@pytest.mark.timed
async def test_a_good_challenger_keeps_its_canary_share_and_is_promoted_once_judged(
    canary_app, channel_to, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    await set_canary(canary_app, 0.5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await set_canary(canary_app, 1.0)  # no decision judged yet
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "promotion refused: not judged yet" in (refused.value.details() or "")
    status = await get_status(canary_app)
    assert status.canary.promotion_refused.startswith("not judged yet")
    stub = decision_stub(channel_to(canary_app))
    sources: list[int] = []
    # Until both sides are judged (25 decisions each): about 60 at the weight of 0.5, but a
    # side's count is random and a slow hour ladders some (in CI once: 44 and 24 of 100).
    while canary_module.waiting_for(canary_app.canary.compare()) and len(sources) < 400:
        sources.append((await stub.Decide(buy(), timeout=2.0)).source)
    assert sources.count(decision_pb2.SOURCE_CANARY) >= 15
    assert sources.count(decision_pb2.SOURCE_PRIMARY) >= 15
    assert canary_app.shared.state.canary(time.time_ns() // 1000)[0] == 0.5
    assert canary_app.canary.breach() is None
    status = await get_status(canary_app)
    assert status.canary.promotion_refused == ""  # judged: a promotion would be taken

    await set_canary(canary_app, 1.0)
    promoted = [(await stub.Decide(buy(), timeout=2.0)).source for _ in range(10)]
    assert promoted == [decision_pb2.SOURCE_CANARY] * 10


@pytest.mark.timed
async def test_an_erroring_challenger_is_rolled_back_within_the_window(
    canary_app, channel_to, feature_writer, challenger_replica
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    await set_canary(canary_app, 0.5)
    stub = decision_stub(channel_to(canary_app))
    challenger_replica.proc.pause()  # every canary call now times out
    try:
        started = time.monotonic()
        while canary_app.shared.state.canary(time.time_ns() // 1000)[0] > 0:
            assert time.monotonic() - started < 10.0, "no rollback within the window"
            response = await stub.Decide(buy(), timeout=2.0)
            # The caller never pays with a fallback: the champion answers.
            assert response.source in (decision_pb2.SOURCE_PRIMARY, decision_pb2.SOURCE_SECONDARY)
        after_rollback = [(await stub.Decide(buy(), timeout=2.0)).source for _ in range(10)]
        assert decision_pb2.SOURCE_CANARY not in after_rollback
    finally:
        challenger_replica.proc.resume()

    status = await get_status(canary_app)
    assert status.canary.weight == 0.0
    assert status.canary.change.changed_by == "auto-rollback"
    assert status.canary.change.reason.startswith("automatic rollback: error/timeout rate")
    rows = await wait_store_rows(Path(canary_app.settings.audit.journal_dir).parent / "audit.db", 2)
    assert rows[-1].actor == "auto-rollback"
    assert rows[-1].before["weight"] == 0.5 and rows[-1].after["weight"] == 0.0


@pytest.mark.timed
async def test_a_slow_but_answering_challenger_is_rolled_back_on_its_p99(
    start_app, replicas, challenger_replica, channel_to, feature_writer, monkeypatch
):
    challenger_replica.ensure_running()
    monkeypatch.setattr(canary_module, "MIN_DECISIONS", 10)
    monkeypatch.setattr(canary_module, "WINDOW_S", 10.0)
    await feature_writer.write_many([sample_record("BTC-USD")])
    app: DecisionApp = await start_app(
        torchserve={
            **replica_settings(replicas),
            "challenger_address": challenger_replica.address,
        },
        # Long enough that the slow challenger's calls all succeed: only p99 breaches.
        deadline={"model_call_ms": 400.0},
        admin={"tokens": TOKENS},
        canary={"max_p99_ratio": 2.0},
    )
    await settle(app)
    await set_canary(app, 0.5)
    stub = decision_stub(channel_to(app))

    async def slow_down() -> None:
        # Stopped 80 % of the time: every call waits up to ~100 ms, none fails.
        while True:
            challenger_replica.proc.pause()
            await asyncio.sleep(0.1)
            challenger_replica.proc.resume()
            await asyncio.sleep(0.025)

    slowing = asyncio.create_task(slow_down())
    try:
        started = time.monotonic()
        while app.shared.state.canary(time.time_ns() // 1000)[0] > 0:
            assert time.monotonic() - started < 15.0, "no rollback within the window"
            response = await stub.Decide(buy(), timeout=2.0)
            assert response.source != decision_pb2.SOURCE_ABSTAIN
    finally:
        slowing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slowing
        challenger_replica.proc.resume()

    weight, change = app.shared.state.canary(time.time_ns() // 1000)
    assert weight == 0.0 and change is not None
    assert change.changed_by == "auto-rollback"
    assert change.reason.startswith("automatic rollback: p99"), change.reason
    assert app.challenger is not None
    assert app.challenger.recent.summary().failures == 0  # slow, never failing


@pytest.mark.timed
async def test_shadow_scores_land_in_the_decision_rows_and_saturation_drops_them(
    start_app, replicas, challenger_replica, channel_to, feature_writer, monkeypatch
):
    challenger_replica.ensure_running()
    await feature_writer.write_many([sample_record("BTC-USD")])
    # One call at a time, and one that outlasts the paused challenger below. No
    # gathering: one call per decision, so the bound is reached call by call.
    one_at_a_time = functools.partial(
        ShadowScorer, max_in_flight=1, timeout_ms=5000.0, batch_window_ms=0.0
    )
    monkeypatch.setattr(server.app, "ShadowScorer", one_at_a_time)
    monkeypatch.setattr(flags, "DEFAULT_SHADOW_SAMPLE_RATE", 1.0)
    app: DecisionApp = await start_app(
        torchserve={
            **replica_settings(replicas),
            "challenger_address": challenger_replica.address,
        },
    )
    await settle(app)
    assert app.challenger is not None
    for _ in range(20):  # the challenger answers promptly (an earlier test paused it)
        await app.challenger.client.predict([[0.0] * MODEL_INPUT_WIDTH], timeout_s=2.0)
    stub = decision_stub(channel_to(app))
    decided = []
    for _ in range(20):
        decided.append(await stub.Decide(buy(), timeout=2.0))
        await asyncio.sleep(0.02)  # one shadow call at a time: let each finish
    assert app.shadow is not None
    stats = app.shadow.stats()
    assert stats.scored >= 15, stats
    assert stats.scored + stats.dropped + stats.failed + stats.in_flight == stats.sampled == 20

    # A stopped challenger: shadow calls pile up to the bound, then are dropped, and the
    # decisions do not wait for them.
    challenger_replica.proc.pause()
    try:
        for _ in range(10):
            response = await stub.Decide(buy(), timeout=2.0)
            decided.append(response)
            assert response.source == decision_pb2.SOURCE_PRIMARY
            assert response.timings.total_us < 50_000
        after = app.shadow.stats()
        assert after.dropped - stats.dropped >= 9, after
    finally:
        challenger_replica.proc.resume()

    database = Path(app.settings.audit.journal_dir).parent / "audit.db"
    shadow_rows = sa.text(
        "SELECT decision_id, score, shadow_model_name, shadow_model_version,"
        " shadow_score FROM decisions WHERE shadow_score IS NOT NULL"
    )
    rows = await wait_store_rows(database, stats.scored, shadow_rows)
    ids = {r.decision_id for r in decided}
    assert {r.decision_id for r in rows} <= ids
    assert {r.shadow_model_name for r in rows} == {"challenger"}
    assert all(0.0 <= r.shadow_score <= 1.0 for r in rows)
    assert any(abs(r.shadow_score - r.score) > 1e-6 for r in rows)  # another model


async def _servers(server: Any) -> dict[str, admin_pb2.ServerInfo]:
    listed = await server.admin.ListServers(
        admin_pb2.ListServersRequest(), metadata=VIEWER, timeout=5.0
    )
    return {s.server_id: s for s in listed.servers}


async def test_every_server_process_is_listed_by_any_server_and_leaves_the_list_on_stop(
    server_processes, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    (single,) = server_processes(1)
    (pair,) = server_processes(1, workers=2)
    try:
        # Each worker of the second server is listed: each has its own breakers.
        for _ in range(50):  # a worker lists itself as it becomes ready: within moments
            if len(listed := await _servers(single)) == 3:
                break
            await asyncio.sleep(0.1)
        assert len(listed) == 3, sorted(listed)
        assert sum(s.admin_address.endswith(f":{pair.admin_port}") for s in listed.values()) == 2
        mine = next(s for s in listed.values() if s.admin_address.endswith(f":{single.admin_port}"))
        assert mine.serving
        assert mine.pid == single.proc.pid
        assert mine.decision_address.endswith(f":{single.port}")
        assert mine.breakers["primary"] == "closed"
        assert mine.HasField("started_at") and mine.HasField("seen_at")
        assert (await _servers(pair)).keys() == listed.keys()  # any server lists them all

        await single.decisions.Decide(buy("BTC-USD"), timeout=2.0)
        deadline = time.monotonic() + 10.0  # entries are rewritten every second
        while (await _servers(pair))[mine.server_id].decisions < 1:
            assert time.monotonic() < deadline, "the decision never showed in the list"
            await asyncio.sleep(0.5)

        await single.close()  # a clean stop removes its entry at once
        assert mine.server_id not in await _servers(pair)
        assert len(await _servers(pair)) == 2
    finally:
        await close_all(single, pair)


async def test_decisionctl_status_shows_the_fleet(server_processes, capsys, monkeypatch):
    a, b = server_processes(2)
    monkeypatch.setenv("DECISIONCTL_TOKEN", VIEWER_TOKEN)
    try:
        argv = ["status", "--address", f"127.0.0.1:{a.admin_port}"]
        assert await asyncio.to_thread(ctl.main, argv) == 0
        out = capsys.readouterr().out
        fleet = out.split("\nfleet\n", 1)[1]
        for server in (a, b):
            assert f":{server.admin_port} " in fleet
            assert f"{server.proc.pid} " in fleet
        assert fleet.count("primary=closed") == 2
    finally:
        await close_all(a, b)


@pytest.mark.timed
async def test_decisionctl_top_rides_out_a_redis_stall_and_shows_it(
    server_processes, redis_instance
):
    """Redis paused under a server (``chaos pause redis``): top keeps drawing frames, says
    what it cannot read while the stall lasts, and reads the fleet again after it. Before,
    top exited 3 at the first fleet list that timed out."""
    (server,) = server_processes(1)
    top = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.admin.ctl", "top", "--frames", "14", "--interval", "0.5",
        "--address", f"127.0.0.1:{server.admin_port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
        env={**os.environ, "DECISIONCTL_TOKEN": VIEWER_TOKEN, "COLUMNS": "200"},
    )  # fmt: skip
    try:
        await asyncio.sleep(1.5)
        redis_instance.proc.pause()
        try:
            await asyncio.sleep(4.0)
        finally:
            redis_instance.proc.resume()
        output, _ = await asyncio.wait_for(top.communicate(), 60)
        code = top.returncode
    finally:
        if top.returncode is None:
            top.kill()
            await top.wait()
        await server.close()
    text = output.decode()
    assert code == 0, text
    frames = text.split("decisionctl top  ")[1:]
    assert len(frames) == 14, text
    stalled = [f for f in frames if "NOT READ: fleet list: " in f]
    assert stalled, text
    assert "1 servers" in frames[0] and "1 servers" in frames[-1], frames[-1]
