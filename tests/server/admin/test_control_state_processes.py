"""On-call's levers through Redis losing its contents, with decision server processes:
two fleets on one Redis, each of two servers on its own audit store (one SQLite, one
PostgreSQL; both in one run, so that the waits are paid once); in each, a kill switch, a
forced-open breaker and a canary weight engaged through AdminService; Redis flushed,
then stopped (a change made meanwhile reaches the other server from the store), then
started empty. Each process obeys all three (its status and its decisions) throughout,
and two new processes of each fleet, started after a fleet restart beside an empty
Redis, obey them too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from core.processes import ManagedProcess, free_port, free_ports, stop_all
from decision_client.v1 import admin_pb2, admin_pb2_grpc, decision_pb2, decision_pb2_grpc
from localstack.health import serving
from tests.conftest import server_process
from tests.server.admin.conftest import OwnRedis
from tests.server.admin.test_control_state_loss import WITHIN_S
from tests.server.conftest import OPERATOR, TOKENS, VIEWER, buy

pytestmark = [pytest.mark.integration, pytest.mark.timed]

KILLED = "SOL-USD"


class Server:
    def __init__(
        self, index: int, redis_url: str, database_url: str, key_prefix: str, run_dir: Path
    ) -> None:
        self.port, self.admin_port, self.metrics_port = free_ports(3)
        nowhere = f"127.0.0.1:{free_port()}"
        self.proc: ManagedProcess = server_process(
            f"decision server {index}",
            run_dir / f"server{index}",
            port=self.port,
            redis_url=redis_url,
            key_prefix=key_prefix,
            primary=nowhere,  # no replica needed
            secondary=nowhere,
            DECISION_TORCHSERVE__CHALLENGER_ADDRESS=nowhere,
            DECISION_ADMIN__PORT=str(self.admin_port),
            DECISION_ADMIN__TOKENS=TOKENS,
            DECISION_SERVER__METRICS_PORT=str(self.metrics_port),
            DECISION_AUDIT__DATABASE_URL=database_url,
        )
        self.proc.start()

    def wait_serving(self) -> None:
        self.proc.wait_ready(lambda: serving(self.port), 30.0)

    def call(self, method: str, request: Any, token: list[tuple[str, str]]) -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{self.admin_port}") as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            return getattr(stub, method)(request, metadata=token, timeout=5.0)

    def decide(self, symbol: str) -> decision_pb2.DecideResponse:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            response: decision_pb2.DecideResponse = stub.Decide(buy(symbol), timeout=2.0)
            return response


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        yield started
    finally:
        stop_all(server.proc for server in started)


def obeys_all_three(server: Server) -> str:
    """What ``server`` does not obey, empty when it obeys all three."""
    status = server.call("GetStatus", admin_pb2.GetStatusRequest(), VIEWER)
    wrong = []
    if [k.scope for k in status.kill_switches] != [KILLED]:
        wrong.append(f"kill switches {[k.scope for k in status.kill_switches]}")
    modes = {r.name: r.mode for r in status.replicas}
    if modes.get("primary") != admin_pb2.BREAKER_MODE_FORCE_OPEN:
        wrong.append(f"primary breaker mode {modes.get('primary')}")
    if abs(status.canary.weight - 0.25) > 1e-9:
        wrong.append(f"canary weight {status.canary.weight}")
    killed = server.decide(KILLED)
    if killed.source != decision_pb2.SOURCE_ABSTAIN or "kill switch" not in killed.reason:
        wrong.append(f"{KILLED} decided by {killed.source}: {killed.reason}")
    return "; ".join(wrong)


def all_obey_within(servers: list[Server], within_s: float) -> None:
    """Every server obeys all three on each look until ``within_s`` has passed."""
    deadline = time.monotonic() + within_s
    while True:
        for server in servers:
            wrong = obeys_all_three(server)
            assert not wrong, f"server on {server.port}: {wrong}"
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)


def all_come_to_obey(servers: list[Server], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while wrong := [f"server on {s.port}: {w}" for s in servers if (w := obeys_all_three(s))]:
        assert time.monotonic() < deadline, "; ".join(wrong)
        time.sleep(0.05)


def test_two_server_processes_obey_the_levers_through_a_redis_flush_stop_and_restart(
    # The servers after Redis and the stores: they stop first, with all still there.
    own_redis: OwnRedis,
    postgres_url: str,
    servers: list[Server],
    tmp_path: Path,
) -> None:
    stores = {"sqlite": f"sqlite:///{tmp_path / 'audit.db'}", "postgresql": postgres_url}

    def start_fleets(first: int) -> list[Server]:
        """Two servers on each store, numbered from ``first``: [store 1's, store 2's]."""
        started = [
            Server(first + 2 * i + j, own_redis.url, url, f"levers-{name}:", tmp_path)
            for i, (name, url) in enumerate(stores.items())
            for j in range(2)
        ]
        for server in started:
            server.wait_serving()
        return started

    servers += start_fleets(0)
    fleets = [servers[0:2], servers[2:4]]
    for first, other in fleets:
        reason = admin_pb2.KillSwitchRequest(scope=KILLED, engaged=True, reason="halt", ttl_s=600)
        first.call("KillSwitch", reason, OPERATOR)
        other.call(
            "SetBreaker",
            admin_pb2.SetBreakerRequest(
                replica="primary", mode=admin_pb2.BREAKER_MODE_FORCE_OPEN, reason="slow", ttl_s=600
            ),
            OPERATOR,
        )
        first.call("SetCanary", admin_pb2.SetCanaryRequest(weight=0.25, reason="try it"), OPERATOR)
    all_come_to_obey(servers)

    with contextlib.closing(redis.Redis(port=own_redis.port)) as client:
        client.flushall()
    all_obey_within(servers, 2.0)

    # Redis stopped: nothing can be announced; the other server of each fleet reads its store.
    own_redis.proc.stop()
    for _, other in fleets:
        other.call(
            "KillSwitch",
            admin_pb2.KillSwitchRequest(scope="ETH-USD", engaged=True, reason="halt", ttl_s=1),
            OPERATOR,
        )
    deadline = time.monotonic() + WITHIN_S
    for first, _ in fleets:
        while "ETH-USD" not in [
            k.scope
            for k in first.call("GetStatus", admin_pb2.GetStatusRequest(), VIEWER).kill_switches
        ]:
            assert time.monotonic() < deadline, "a change made while Redis was down did not arrive"
            time.sleep(0.05)
    own_redis.restart_empty()
    all_come_to_obey(servers)  # the one-second kill switches on ETH-USD have expired
    all_obey_within(servers, 2.0)

    # A fleet restart beside an empty Redis: the new ones take the levers from their store.
    stop_all(server.proc for server in servers)
    own_redis.restart_empty()
    servers[:] = start_fleets(4)
    all_obey_within(servers, 1.0)
