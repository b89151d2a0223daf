"""ControlPlane and SharedControl against a real redis-server and a real audit store:
audit rows that say what a change really replaced, written with the change or not at all,
one rollback however many servers see a breach, and what a server does while Redis is
unreachable.

Several ``SharedControl``s on one key prefix and one store stand for several servers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from core.processes import free_port
from decision_client.v1 import admin_pb2, admin_pb2_grpc
from feature_cache.store import FeatureReader
from localstack.redis_server import start_redis
from server.admin.control_plane import ControlPlane
from server.app import DecisionApp
from server.audit.record import AdminRecord
from server.audit.store import AdminActionQuery, AuditStore, create_store_engine
from server.control import canary as canary_module
from server.control.canary import CANARY, CHAMPION, CanaryMonitor
from server.control.changes import AUTO_ROLLBACK_ACTOR, AuditedChanges, CanaryRollback
from server.control.durable import ControlStore
from server.control.flags import flag_specs
from server.control.shared import NOT_READ, SharedControl
from server.control.state import BreakerMode
from server.errors import FailedPrecondition, SharedStateUnavailable
from server.settings import CanarySettings
from tests.conftest import RedisInstance
from tests.server.conftest import OPERATOR, TOKENS, VIEWER

pytestmark = [pytest.mark.integration, pytest.mark.timed]

ADDRESSES = {"primary": "p:1", "secondary": "s:1", "challenger": "c:1"}


def shared_control(redis_url: str, key_prefix: str, database_url: str) -> SharedControl:
    """A server's control state, as the app builds it."""
    return SharedControl(
        redis_url,
        store=ControlStore(create_store_engine(database_url), migrate=True),
        key_prefix=key_prefix,
        flags=flag_specs(),
    )


def admin_rows(database_url: str) -> list[AdminRecord]:
    """The admin audit rows, oldest first."""
    store = AuditStore(create_store_engine(database_url))
    try:
        return list(reversed(store.admin_actions(AdminActionQuery(limit=1000))))
    finally:
        store.dispose()


Server = tuple[ControlPlane, SharedControl]


@pytest.fixture
def store_url(database_url: str) -> str:
    """The deployment's one audit store (SQLite and PostgreSQL)."""
    return database_url


@pytest.fixture
async def servers(
    redis_instance: RedisInstance, key_prefix: str, store_url: str
) -> AsyncIterator[Callable[..., Server]]:
    """Makes control planes sharing one Redis, key prefix and store (a deployment's
    servers)."""
    started: list[SharedControl] = []
    clients: list[aioredis.Redis] = []

    def start(canary: CanaryMonitor | None = None, database_url: str = store_url) -> Server:
        shared = shared_control(redis_instance.url, key_prefix, database_url)
        client = aioredis.Redis.from_url(redis_instance.url)
        clients.append(client)
        plane = ControlPlane(
            changes=AuditedChanges(shared),
            replicas=[],
            addresses=ADDRESSES,
            canary=canary,
            server_id=lambda: "test",
            features=FeatureReader(client, key_prefix=key_prefix),
        )
        started.append(shared)
        return plane, shared

    try:
        yield start
    finally:
        for shared in started:
            await shared.stop()
        for client in clients:
            await client.aclose()


async def test_a_change_the_store_does_not_take_is_made_nowhere(servers, store_url) -> None:
    unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/audit"
    plane, shared = servers(database_url=unreachable)
    _, other = servers()
    await shared.start()
    await other.start()
    assert not shared.status().durable_ok and shared.status().durable_error

    with pytest.raises(SharedStateUnavailable, match="audit store did not take the change"):
        await plane.kill_switch("oncall", "BTC-USD", True, "bad prints", ttl_s=0)
    await other.refresh()
    now_us = time.time_ns() // 1000
    assert other.state.kill_switch("BTC-USD", now_us) is None
    assert admin_rows(store_url) == []
    # Never having read the store, that server stops every symbol, and says why.
    stopped = shared.state.kill_switch("ETH-USD", now_us)
    assert stopped is not None and stopped[0] == "*"
    assert stopped[1].reason == NOT_READ


async def test_the_audit_row_says_what_was_replaced_even_when_this_server_had_not_heard(
    servers, store_url
) -> None:
    plane_a, shared_a = servers()
    plane_b, shared_b = servers()
    await shared_b.start()  # A is not listening: it will not hear of B's change
    await plane_b.set_flag(
        "dashboard", "shadow_sample_rate", "0.3", reset=False, reason="b", ttl_s=0
    )
    # Only the store can say what A's change replaces.
    assert shared_a.state.flag_value("shadow_sample_rate", time.time_ns() // 1000) == 0.0

    before, after = await plane_a.set_flag(
        "oncall", "shadow_sample_rate", "0.7", reset=False, reason="a", ttl_s=0
    )
    assert (before.value, after.value) == ("0.3", "0.7")
    assert before.change is not None and before.change.changed_by == "dashboard"
    row = admin_rows(store_url)[-1]
    assert row.before["value"] == "0.3" and row.before["changed_by"] == "dashboard"
    assert row.after["value"] == "0.7"


async def test_a_breach_seen_by_every_server_is_rolled_back_and_audited_once(
    servers, store_url
) -> None:
    deployment = [servers() for _ in range(4)]
    for _, shared in deployment:
        await shared.start()
    await deployment[0][0].set_canary("oncall", 0.2, "try the challenger")
    for _, shared in deployment:
        await shared.refresh()

    await asyncio.gather(
        *(
            CanaryRollback(AuditedChanges(shared)).roll_back("p99 90 ms vs champion 8 ms")
            for _, shared in deployment
        )
    )
    rollbacks = [row for row in admin_rows(store_url) if row.actor == AUTO_ROLLBACK_ACTOR]
    assert len(rollbacks) == 1
    assert rollbacks[0].before["weight"] == 0.2 and rollbacks[0].after["weight"] == 0.0
    for _, shared in deployment:
        await shared.refresh()
        assert shared.state.canary(time.time_ns() // 1000)[0] == 0.0


class UnchangingCanary:
    """A canary lever whose setting never changes: the monitor keeps what it records."""

    def setting(self) -> object:
        return "unchanged"

    def enabled(self) -> bool:
        return False

    async def roll_back(self, breach: str) -> bool:
        return False


async def test_a_promotion_needs_a_canary_judged_on_this_server_unless_forced(
    servers, store_url, monkeypatch
) -> None:
    monkeypatch.setattr(canary_module, "MIN_DECISIONS", 10)
    monkeypatch.setattr(canary_module, "PSI_MIN_SCORES", 10)
    canary = CanaryMonitor(CanarySettings(), UnchangingCanary())
    plane, shared = servers(canary)
    await shared.start()

    with pytest.raises(FailedPrecondition, match="no canary is running"):
        await plane.set_canary("oncall", 1.0, "ship it")
    await plane.set_canary("oncall", 0.1, "try it")
    for _ in range(10):
        canary.record(CHAMPION, ok=True, elapsed_ms=2.0, fell_back=False, scores=(0.5,))
    for _ in range(9):
        canary.record(CANARY, ok=True, elapsed_ms=2.0, fell_back=False, scores=(0.5,))
    with pytest.raises(FailedPrecondition, match=r"not judged yet: .*\(canary 9, champion 10\)"):
        await plane.set_canary("oncall", 1.0, "ship it")
    assert shared.state.canary(time.time_ns() // 1000)[0] == pytest.approx(0.1)

    canary.record(CANARY, ok=True, elapsed_ms=2.0, fell_back=False, scores=(0.5,))
    assert await plane.set_canary("oncall", 1.0, "judged good") == (pytest.approx(0.1), 1.0)
    assert await plane.set_canary("oncall", 1.0, "again") == (1.0, 1.0)  # nothing to judge
    await canary.stop()
    assert [row.after for row in admin_rows(store_url)] == [{"weight": w} for w in (0.1, 1.0, 1.0)]


async def test_a_forced_promotion_goes_through_and_is_audited_as_forced(servers, store_url) -> None:
    plane, shared = servers()
    await shared.start()
    await plane.set_canary("oncall", 1.0, "challenger is the fix, INC-9", force=True)
    assert shared.state.canary(time.time_ns() // 1000)[0] == 1.0
    assert admin_rows(store_url)[-1].after == {"weight": 1.0, "forced": True}
    # force means nothing below weight 1: a canary step is audited as one.
    await plane.set_canary("oncall", 0.5, "step back", force=True)
    assert admin_rows(store_url)[-1].after == {"weight": 0.5}


async def test_without_redis_a_server_keeps_its_state_says_so_and_still_takes_changes(
    start_app, tmp_path: Path
) -> None:
    port = free_port()
    redis_proc = start_redis(port, tmp_path / "redis")
    try:
        app: DecisionApp = await start_app(
            redis={"url": f"redis://127.0.0.1:{port}/0"},
            admin={"tokens": TOKENS},
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.admin_port}") as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            force_open = admin_pb2.SetBreakerRequest(
                replica="secondary", mode=admin_pb2.BREAKER_MODE_FORCE_OPEN, reason="slow"
            )
            await admin.SetBreaker(force_open, metadata=OPERATOR, timeout=5.0)

            redis_proc.pause()  # Redis stops answering: connections hang, as on a partition
            try:
                deadline = time.monotonic() + 5.0
                while app.shared.status().listening:
                    assert time.monotonic() < deadline, "still following a stopped Redis"
                    await asyncio.sleep(0.05)
                status = await admin.GetStatus(
                    admin_pb2.GetStatusRequest(), metadata=VIEWER, timeout=5.0
                )
                assert not status.shared_state.in_sync
                assert status.shared_state.error
                assert status.shared_state.durable_ok
                # The last known override is still applied.
                modes = {r.name: r.mode for r in status.replicas}
                assert modes["secondary"] == admin_pb2.BREAKER_MODE_FORCE_OPEN
                now_us = time.time_ns() // 1000
                assert app.shared.state.breaker_mode("secondary", now_us) is BreakerMode.FORCE_OPEN

                # The store takes the change: it holds on this server at once (the others
                # read it from the store within a second).
                await admin.KillSwitch(
                    admin_pb2.KillSwitchRequest(scope="*", engaged=True, reason="stop"),
                    metadata=OPERATOR,
                    timeout=5.0,
                )
                assert app.shared.state.kill_switch("BTC-USD", time.time_ns() // 1000)
            finally:
                redis_proc.resume()

            deadline = time.monotonic() + 5.0
            while not app.shared.status().listening:
                assert time.monotonic() < deadline, "not following again after Redis returned"
                await asyncio.sleep(0.05)
            status = await admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=VIEWER)
            assert status.shared_state.in_sync and not status.shared_state.error
            assert [k.scope for k in status.kill_switches] == ["*"]
            assert status.shared_state.losses == 0
    finally:
        redis_proc.stop()


async def test_a_control_state_stopped_right_after_a_change_stops(servers) -> None:
    """Its listener's cancellation was once lost in the Redis calls: stop never ended."""
    plane, shared = servers()
    await shared.start()
    await plane.set_canary("oncall", 0.5, "a change just published")
    # Not under a timeout: stop() would swallow the timeout's cancellation and return.
    stopping = asyncio.create_task(shared.stop())
    done, _ = await asyncio.wait([stopping], timeout=5.0)
    assert stopping in done, "stop() still waits for the listener"
