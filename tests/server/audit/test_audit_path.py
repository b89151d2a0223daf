"""The audit trail behind a real decision server: killed mid-load, database gone, records
complete."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.processes import ManagedProcess, free_port
from decision_client.v1 import decision_pb2, decision_pb2_grpc
from localstack.health import serving
from server.audit.store import AuditStore, create_store_engine, decisions
from tests.conftest import server_process, wait_for
from tests.server.audit.proxy import TcpProxy
from tests.server.conftest import (
    UNHURRIED,
    UNHURRIED_ENV,
    audited_decision,
    buy,
    decision_stub,
    replica_settings,
    sample_record,
)

# Every server here runs on UNHURRIED budgets: the tests judge what is stored, not how fast
# it was answered, and run beside others.
pytestmark = pytest.mark.integration


# How gRPC's core refuses a call past the server's queue limit (server/front.py).
REFUSED = grpc.StatusCode.CANCELLED


# A call's deadline in the load: past any budget of UNHURRIED's, however busy the machine.
CALL_TIMEOUT_S = 5.0


async def until_served(load: Load, count: int, timeout_s: float = 30.0) -> None:
    """Until ``load`` has ``count`` OK answers (fails after ``timeout_s``)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(load.ok_ids) < count:
        assert asyncio.get_running_loop().time() < deadline, (len(load.ok_ids), load.errors)
        await asyncio.sleep(0.05)


class Load:
    """Closed-loop Decide calls from ``concurrency`` tasks; remembers every OK decision id."""

    def __init__(self, port: int, concurrency: int = 8) -> None:
        self.port = port
        self.concurrency = concurrency
        self.ok_ids: set[str] = set()
        self.errors: Counter[grpc.StatusCode] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.concurrency)]

    async def _worker(self, n: int) -> None:
        symbols = ("BTC-USD", "ETH-USD")
        # Reconnect quickly once a killed server is back (gRPC's default backoff is 1 s+).
        options = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 200),
            # A connection of its own: the kernel spreads connections over workers.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options) as channel:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            i = 0
            while not self._stop.is_set():
                i += 1
                try:
                    response = await stub.Decide(
                        buy(symbols[i % 2], request_id=f"w{n}-{i}"), timeout=CALL_TIMEOUT_S
                    )
                except grpc.aio.AioRpcError as exc:
                    self.errors[exc.code()] += 1
                    await asyncio.sleep(0.01)  # the server is down: do not spin
                    continue
                self.ok_ids.add(response.decision_id)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def listeners(port: int) -> int:
    """Sockets listening on ``port``: each worker of a server holds its own (SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                count += fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port
    return count


def start_server(proc: ManagedProcess, port: int, workers: int = 1) -> ManagedProcess:
    """Starts ``proc`` (its workers in its process group) and waits until it serves on
    every worker (callers that connect before a worker listens all reach the others)."""
    proc.start()
    proc.wait_ready(lambda: serving(port) and listeners(port) >= workers, 30.0)
    return proc


@pytest.mark.parametrize(("database", "workers"), [("sqlite", 1), ("postgresql", 1), ("sqlite", 2)])
async def test_every_decision_answered_ok_is_stored_after_a_sigkill_mid_load(
    database, workers, replicas, redis_instance, key_prefix, feature_writer, tmp_path, request
):
    """Every process of the server is killed at once (a container killed), mid-load;
    with several workers, each one's journal is shipped by the next run's."""
    url = (
        f"sqlite:///{tmp_path / 'audit.db'}"
        if database == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    for symbol in ("BTC-USD", "ETH-USD"):
        await feature_writer.write_many([sample_record(symbol)])
    port = free_port()
    server = server_process(
        "decision server",
        tmp_path,
        port=port,
        redis_url=redis_instance.url,
        key_prefix=key_prefix,
        primary=replicas["primary"].address,
        secondary=replicas["secondary"].address,
        DECISION_AUDIT__DATABASE_URL=url,
        DECISION_AUDIT__FSYNC_INTERVAL_MS="1000",
        DECISION_SERVER__WORKERS=str(workers),
        DECISION_ADMIN__PORT=str(free_port()),
        **UNHURRIED_ENV,
    )
    start_server(server, port, workers)
    load = Load(port)
    engine = create_store_engine(url)
    store = AuditStore(engine)
    try:
        load.start()
        await until_served(load, 200)
        await asyncio.to_thread(server.kill)  # every worker at once
        served_before_kill = len(load.ok_ids)
        await asyncio.sleep(0.3)  # callers now see UNAVAILABLE
        await asyncio.to_thread(start_server, server, port, workers)
        await until_served(load, served_before_kill + 100)  # the restarted server served
        await load.stop()

        # UNAVAILABLE while the server was down; CANCELLED for a call its queue limit
        # refused (8 callers, a busy loop): no decision made, so nothing to store.
        assert set(load.errors) <= {grpc.StatusCode.UNAVAILABLE, REFUSED}, load.errors

        # The restarted server ships the killed one's journal, then its own.
        ok_ids = list(load.ok_ids)
        await asyncio.to_thread(
            wait_for, lambda: len(store.decision_ids(ok_ids)) == len(ok_ids), 30
        )
        server.signal_group(signal.SIGTERM)
        assert await asyncio.to_thread(server.wait, 20) == 0
        missing = load.ok_ids - store.decision_ids(ok_ids)
        assert not missing, f"{len(missing)} decisions answered OK but not stored"
        with engine.connect() as connection:
            servers = set(connection.scalars(sa.select(decisions.c.server_id).distinct()))
        assert len(servers) == workers, servers  # every worker served
    finally:
        await load.stop()
        server.kill()
        store.dispose()


@pytest.fixture
def store_proxy(postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy to the test database and the URL through it. Asked for before
    ``start_app``, it closes after the apps stop: their shippers drain through it."""
    target = sa.make_url(postgres_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    proxy.start()
    through = target.set(host="127.0.0.1", port=proxy.port)
    try:
        yield proxy, through.render_as_string(hide_password=False)
    finally:
        proxy.close()


async def test_decisions_go_on_while_the_database_is_down_and_all_arrive_after(
    store_proxy, replicas, start_app, channel_to, feature_writer, postgres_url
):
    for symbol in ("BTC-USD", "ETH-USD"):
        await feature_writer.write_many([sample_record(symbol)])
    proxy, proxied = store_proxy
    app = await start_app(
        torchserve=replica_settings(replicas),
        audit={"database_url": proxied},
        server={"metrics_port": free_port()},
        **UNHURRIED,
    )
    health = health_pb2_grpc.HealthStub(channel_to(app))
    load = Load(app.port)
    load.start()
    await until_served(load, 50)

    proxy.cut()
    await asyncio.to_thread(wait_for, lambda: not app.audit.status().shipper.store_ok, 10)
    audit_down = health_pb2.HealthCheckRequest(service="decision.audit")
    for _ in range(40):
        audit_health = await health.Check(audit_down, timeout=1)
        if audit_health.status != health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.05)
    await until_served(load, len(load.ok_ids) + 50)  # decisions go on with the store away
    backlog = app.audit.status().shipper.backlog_bytes
    metrics_down = await asyncio.to_thread(scrape, app.metrics.port)
    proxy.restore()
    await asyncio.sleep(0.5)
    await load.stop()

    assert audit_health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert backlog > 0
    assert metrics_down["decision_audit_store_up"] == 0.0
    assert metrics_down["decision_audit_backlog_bytes"] > 0
    # No decision failed because of the database (the queue limit may refuse a call).
    assert set(load.errors) <= {REFUSED}, load.errors
    served = len(load.ok_ids)

    engine = create_store_engine(postgres_url)
    try:
        store = AuditStore(engine)
        await asyncio.to_thread(wait_for, lambda: store.count_decisions() == served, 30)
        assert store.decision_ids() == load.ok_ids
    finally:
        engine.dispose()
    # The shipper's process reports every 100 ms: its count follows the store's.
    await asyncio.to_thread(
        wait_for, lambda: app.audit.status().shipper.shipped_records >= served, 5
    )
    assert app.audit.status().shipper.store_ok
    metrics_up = await asyncio.to_thread(scrape, app.metrics.port)
    assert metrics_up["decision_audit_store_up"] == 1.0
    assert metrics_up["decision_audit_shipped_records_total"] >= served


def scrape(port: int) -> dict[str, float]:
    """The endpoint's samples without labels, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_the_record_holds_what_the_service_knew(
    replicas, start_app, channel_to, feature_writer, model_store
):
    await feature_writer.write_many([sample_record("BTC-USD", spread_bps=3.25)])
    app = await start_app(torchserve=replica_settings(replicas), **UNHURRIED)
    stub = decision_stub(channel_to(app))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await stub.Decide(
        buy(
            request_id="audit-1",
            client_id="desk-7",
            quantity=2.5,
            feature_overrides={"ofi_1s": 0.75},
        ),
        metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),),
        timeout=2.0,
    )
    row = await audited_decision(app, response.decision_id)
    _, archive = model_store
    assert row["request_id"] == "audit-1"
    assert row["trace_id"] == trace_id
    assert row["client_id"] == "desk-7"
    assert str(row["caller"]).startswith("ipv4:127.0.0.1:")
    assert row["symbol"] == "BTC-USD" and row["side"] == "BUY" and row["quantity"] == 2.5
    assert row["source"] == "PRIMARY" and row["decision"] in ("TRADE", "NO_TRADE")
    assert row["score"] == response.score and row["threshold"] == response.threshold
    assert row["model_name"] == "champion" and row["model_version"] == archive.version
    assert row["feature_schema_version"] == 1
    features = row["features"]
    assert isinstance(features, dict)
    assert features["spread_bps"] == 3.25 and features["ofi_1s"] == 0.75
    assert row["feature_overrides"] == {"ofi_1s": 0.75}
    assert row["reason"] == response.reason
    assert row["reason_code"] == "model_answered"
    assert response.reason_code == decision_pb2.REASON_CODE_MODEL_ANSWERED
    assert row["total_us"] == response.timings.total_us
    assert str(row["server_id"]).endswith(f":{app.port}")

    # request_id is a correlation id, not an idempotency key (decision.proto): the same
    # request again is decided and audited again, under a decision id of its own.
    again = await stub.Decide(buy(request_id="audit-1", client_id="desk-7"), timeout=2.0)
    assert again.request_id == "audit-1"
    assert again.decision_id != response.decision_id
    assert (await audited_decision(app, again.decision_id))["request_id"] == "audit-1"


async def test_a_journal_at_its_cap_refuses_decisions_until_the_store_catches_up(
    store_proxy, replicas, start_app, channel_to, feature_writer, postgres_url
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    proxy, proxied = store_proxy
    cap = 20_000  # about 17 decision records
    app = await start_app(
        torchserve=replica_settings(replicas),
        audit={"database_url": proxied, "max_backlog_bytes": cap},
        **UNHURRIED,
    )
    stub = decision_stub(channel_to(app))
    proxy.cut()
    # The store is found away when there is something to ship.
    answered = {(await stub.Decide(buy(), timeout=2.0)).decision_id}
    await asyncio.to_thread(wait_for, lambda: not app.audit.status().shipper.store_ok, 10)
    refused = None
    for _ in range(500):
        try:
            answered.add((await stub.Decide(buy(), timeout=2.0)).decision_id)
        except grpc.aio.AioRpcError as exc:
            refused = exc
            break
        await asyncio.sleep(0.005)
    assert refused is not None, "the journal grew past its cap"
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "MAX_BACKLOG_BYTES" in (refused.details() or "")
    status = app.audit.status()
    assert status.shipper.full and status.refused_decisions == 1
    # Refused within one retry wait of the cap: the journal stayed near it.
    assert cap <= status.shipper.backlog_bytes < cap + 100_000

    proxy.restore()
    await asyncio.to_thread(wait_for, lambda: not app.audit.status().shipper.full, 20)
    answered.add((await stub.Decide(buy(), timeout=2.0)).decision_id)
    engine = create_store_engine(postgres_url)
    try:
        store = AuditStore(engine)
        await asyncio.to_thread(wait_for, lambda: store.count_decisions() == len(answered), 30)
        assert store.decision_ids() == answered  # every answered decision, none refused
    finally:
        engine.dispose()
