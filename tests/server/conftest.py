"""A real DecisionApp (in the test's event loop) wired to real Redis and TorchServe, and
decision server processes (``python -m server``, as users run it) on the same."""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from grpc_status import rpc_status

from core.processes import ManagedProcess, free_port, free_ports, stop_all
from decision_client.v1 import admin_pb2_grpc, decision_pb2, decision_pb2_grpc
from feature_cache.schema import FEATURE_NAMES, MODEL_INPUT_WIDTH
from feature_cache.store import FeatureRecord, FeatureWriter
from localstack.health import serving
from server.app import DecisionApp
from server.audit.store import decisions
from server.model_errors import ModelCallError
from server.settings import Settings
from server.tracing import Tracing
from tests.conftest import (
    RedisInstance,
    Replica,
    server_process,
    wait_for,
)

# Features that give a real score; the rules see a tight spread and a buy-side lean.
SAMPLE_FEATURES = {
    "spread_bps": 2.0,
    "imbalance_l1": 0.3,
    "imbalance_l5": 0.25,
    "ofi_1s": 0.1,
    "ofi_5s": 0.05,
    "realized_vol_5s_bps": 4.0,
    "realized_vol_30s_bps": 6.0,
    "mid_return_1s_bps": 0.5,
    "mid_return_5s_bps": 1.0,
    "trade_intensity_5s": 2.0,
    "signed_volume_5s": 0.2,
}


# Budgets no busy machine overruns: a test that asserts who answered, not how fast, passes
# these to ``start_app`` and runs beside other tests (it needs no ``timed`` mark).
UNHURRIED: dict[str, dict[str, Any]] = {
    "deadline": {"model_call_ms": 2000.0, "store_read_ms": 1000.0},
    "breaker": {"slow_call_ms": 1500.0},
}
# The same budgets as a server process's environment.
UNHURRIED_ENV: dict[str, str] = {
    f"DECISION_{section.upper()}__{name.upper()}": str(value)
    for section, values in UNHURRIED.items()
    for name, value in values.items()
}


def sample_record(
    symbol: str, *, age_ms: float = 0.0, offset: int = 1, **changes: float
) -> FeatureRecord:
    values = {**SAMPLE_FEATURES, **changes}
    return FeatureRecord(
        symbol=symbol,
        values=tuple(values[name] for name in FEATURE_NAMES),
        event_time_us=time.time_ns() // 1000 - int(age_ms * 1000),
        source_offset=offset,
    )


def make_settings(
    redis_url: str, key_prefix: str, run_dir: Path, **sections: dict[str, Any]
) -> Settings:
    """Test settings; the audit journal and SQLite store go under ``run_dir``."""
    base: dict[str, dict[str, Any]] = {
        "audit": {
            "journal_dir": str(run_dir / "journal"),
            "database_url": f"sqlite:///{run_dir / 'audit.db'}",
        },
        "server": {"port": 0, "grace_period_s": 1.0, "metrics_port": 0},
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        # A busy test machine can take longer than the defaults for a Redis read or a
        # model call: generous caps, unless a test is about timeouts.
        "deadline": {"store_read_ms": 200.0, "model_call_ms": 500.0},
        # Tests write features once; a long bound keeps them fresh however slow the machine.
        "features": {"max_age_ms": 120_000.0},
        # Nothing listens on these unless a test passes its replicas' addresses.
        "torchserve": {
            "primary_address": f"127.0.0.1:{free_port()}",
            "secondary_address": f"127.0.0.1:{free_port()}",
            "challenger_address": "",
        },
        "admin": {"port": 0},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
def replicas(replicas: dict[str, Replica]) -> dict[str, Replica]:
    """The session's replicas, running and not paused (an earlier test may have broken one)."""
    for replica in replicas.values():
        replica.ensure_running()
    return replicas


def replica_settings(replicas: dict[str, Replica], **torchserve: object) -> dict[str, object]:
    """The test's replicas."""
    return {
        "primary_address": replicas["primary"].address,
        "secondary_address": replicas["secondary"].address,
        **torchserve,
    }


async def settle(app: DecisionApp, *, answer_within_ms: float = 10.0, times: int = 5) -> None:
    """Waits until every replica of ``app`` answers ``times`` calls in a row within
    ``answer_within_ms``. A JVM that an earlier test restarted or resumed is still
    compiling or working off its backlog for a while; a test about deadlines must not
    start in that window on a 2-core machine."""
    row = [[0.0] * MODEL_INPUT_WIDTH]
    for replica in app.replicas:
        deadline = time.monotonic() + 20
        fast = 0
        while fast < times:
            assert time.monotonic() < deadline, f"{replica.name} is not answering promptly"
            started = time.monotonic()
            try:
                await replica.client.predict(row, timeout_s=1.0)
            except ModelCallError:  # still starting: try again
                fast = 0
                await asyncio.sleep(0.05)
                continue
            fast = fast + 1 if (time.monotonic() - started) * 1000 < answer_within_ms else 0


@pytest.fixture
async def feature_writer(
    redis_client: aioredis.Redis, key_prefix: str, running_apps: list[DecisionApp]
) -> MirroredFeatureWriter:
    return MirroredFeatureWriter(
        FeatureWriter(redis_client, key_prefix=key_prefix, ttl_s=60), running_apps
    )


async def mirrored(apps: list[DecisionApp], records: list[FeatureRecord]) -> None:
    """Waits until the feature mirror of every app in ``apps`` holds ``records`` (or newer):
    it hears of a write a few ms after Redis has it, and a test decides at once."""
    deadline = time.monotonic() + 10
    for app in apps:
        mirror = app.mirror
        if not mirror.live:
            continue  # the app reads Redis
        for record in records:
            while (
                (held := mirror.lookup([record.symbol])) is None
                or held[0] is None
                or (
                    held[0].event_time_us,
                    held[0].source_offset,
                )
                < (record.event_time_us, record.source_offset)
            ):
                assert time.monotonic() < deadline, f"{record.symbol} not mirrored in time"
                await asyncio.sleep(0.002)


class MirroredFeatureWriter:
    """The consumer's ``FeatureWriter``, returning once the running apps' mirrors have
    what it wrote."""

    def __init__(self, writer: FeatureWriter, apps: list[DecisionApp]) -> None:
        self._writer = writer
        self._apps = apps

    async def write_many(self, records: list[FeatureRecord]) -> int:
        written = await self._writer.write_many(records)
        await mirrored(self._apps, records)
        return written


@pytest.fixture
def running_apps() -> list[DecisionApp]:
    return []


@pytest.fixture
async def start_app(
    redis_instance: RedisInstance, key_prefix: str, tmp_path: Path, running_apps: list[DecisionApp]
) -> AsyncIterator[Callable[..., Any]]:
    """Starts DecisionApps with settings sections merged over the test defaults; each app
    has an audit folder of its own under the test's ``tmp_path``. Returns once the app is
    SERVING and its feature mirror (when on) is live."""
    apps = running_apps

    async def _start(tracing: Tracing | None = None, **sections: dict[str, Any]) -> DecisionApp:
        run_dir = tmp_path / f"app{len(apps)}"
        settings = make_settings(redis_instance.url, key_prefix, run_dir, **sections)
        app = DecisionApp(settings, tracing=tracing)
        await app.start()
        await app.wait_ready()
        deadline = time.monotonic() + 10
        while not app.mirror.live:
            assert time.monotonic() < deadline, "the feature mirror did not load"
            await asyncio.sleep(0.005)
        apps.append(app)
        # As serve() does in a server process: start-up's objects stay out of full passes.
        gc.freeze()
        return app

    try:
        yield _start
    finally:
        for app in apps:
            await app.stop()
        if apps:
            # Frozen objects are never collected: the stopped apps' garbage is let go (the
            # next app's start freezes what is still alive again).
            gc.unfreeze()


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[DecisionApp], grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []

    def _open(app: DecisionApp) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        channels.append(channel)
        return channel

    try:
        yield _open
    finally:
        for channel in channels:
            await channel.close()


def decision_stub(channel: grpc.aio.Channel) -> decision_pb2_grpc.DecisionServiceAsyncStub:
    return decision_pb2_grpc.DecisionServiceStub(channel)


def buy(symbol: str = "BTC-USD", **fields: Any) -> decision_pb2.DecideRequest:
    return decision_pb2.DecideRequest(
        **{"symbol": symbol, "side": decision_pb2.SIDE_BUY, "quantity": 1.0, **fields}
    )


OPERATOR_TOKEN = "operator-token-0123456789"  # noqa: S105 - test token
VIEWER_TOKEN = "viewer-token-0123456789"  # noqa: S105 - test token
TOKENS = f"oncall operator {OPERATOR_TOKEN}, dashboard viewer {VIEWER_TOKEN}"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


OPERATOR = bearer(OPERATOR_TOKEN)
VIEWER = bearer(VIEWER_TOKEN)


class ServerProcess:
    def __init__(self, proc: ManagedProcess, port: int, admin_port: int, run_dir: Path) -> None:
        self.proc = proc
        self.port = port
        self.admin_port = admin_port
        self.run_dir = run_dir
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}")
        self.decisions = decision_stub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.admin_channel)

    async def close(self) -> None:
        await close_all(self)


async def close_all(*servers: ServerProcess) -> None:
    """Closes their channels, then stops them side by side (each stop is mostly a drain)."""
    for server in servers:
        await server.channel.close()
        await server.admin_channel.close()
    await asyncio.to_thread(stop_all, [server.proc for server in servers])


# Connections a test of ``--workers 2`` opens so that both workers get some. The kernel
# gives each new connection to one of the SO_REUSEPORT listeners by a hash of its
# addresses and ports, so all of n connections reach the same worker 2 ** (1 - n) of the
# time: with 8, 0.7 % (21 of 3,000 tries of two listening sockets here), which failed a CI
# run (every decision in the audit store from w0); with 16, 0.003 %.
WORKER_CONNECTIONS = 16
# The async stub type exists only in the generated type stubs.
DecisionStubs = list["decision_pb2_grpc.DecisionServiceAsyncStub"]


@asynccontextmanager
async def worker_connections(server: ServerProcess) -> AsyncIterator[DecisionStubs]:
    """``WORKER_CONNECTIONS`` channels to ``server``, each with a connection of its own."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options)
        for _ in range(WORKER_CONNECTIONS)
    ]
    try:
        yield [decision_stub(channel) for channel in channels]
    finally:
        for channel in channels:
            await channel.close()


def ready_workers(log_path: Path, workers: int) -> bool:
    """Whether ``workers`` workers of a server process have logged that they serve."""
    try:
        return log_path.read_text().count("ready: health SERVING") >= workers
    except FileNotFoundError:
        return False


@pytest.fixture
def server_processes(
    redis_instance: RedisInstance, key_prefix: str, replicas: dict[str, Replica], tmp_path: Path
) -> Iterator[Callable[..., list[ServerProcess]]]:
    """Starts decision server processes on one Redis, key prefix and audit store (a
    deployment): ``tmp_path / "audit.db"``."""
    started: list[ServerProcess] = []

    def start(count: int, workers: int = 1, **settings: str) -> list[ServerProcess]:
        """``settings``: more DECISION_* variables for every one of them."""
        for i in range(count):
            port, admin_port = free_ports(2)
            run_dir = tmp_path / f"server{i}"
            proc = server_process(
                f"decision server {i}",
                run_dir,
                port=port,
                redis_url=redis_instance.url,
                key_prefix=key_prefix,
                primary=replicas["primary"].address,
                secondary=replicas["secondary"].address,
                DECISION_TELEMETRY__LOG_LEVEL="INFO",
                DECISION_ADMIN__PORT=str(admin_port),
                DECISION_ADMIN__TOKENS=TOKENS,
                DECISION_SERVER__WORKERS=str(workers),
                DECISION_AUDIT__DATABASE_URL=f"sqlite:///{tmp_path / 'audit.db'}",
                **settings,
            )
            started.append(ServerProcess(proc, port, admin_port, run_dir))
            proc.start()
        for server in started[-count:]:
            server.proc.wait_ready(functools.partial(serving, server.port), 30.0)
            # One worker serving answers the health check; the kernel gives connections
            # only to workers already listening, so a test about several waits for all.
            every_worker = functools.partial(ready_workers, server.run_dir / "server.log", workers)
            server.proc.wait_ready(every_worker, 30.0)
        return started[-count:]

    try:
        yield start
    finally:
        stop_all(server.proc for server in started)


def status_details(error: grpc.aio.AioRpcError) -> list[Any]:
    """The ``google.rpc.Status`` details of a failed call, read as gRPC's clients read
    them (grpcio-status; an AioRpcError has the ``code()`` and ``trailing_metadata()`` it
    reads, though it is not typed as a ``grpc.Call``)."""
    status = rpc_status.from_call(cast(grpc.Call, error))
    assert status is not None, "no google.rpc.Status in the trailing metadata"
    return list(status.details)


async def audited_decision(app: DecisionApp, decision_id: str) -> dict[str, Any]:
    """The audit store's row of ``decision_id``, once the app's shipper has put it there
    (store_ok first: it holds once the shipper has migrated the schema and inserted)."""
    engine = app.audit.store.engine

    def stored() -> dict[str, Any] | None:
        with engine.connect() as conn:
            query = sa.select(decisions).where(decisions.c.decision_id == decision_id)
            row = conn.execute(query).mappings().first()
        return dict(row) if row else None

    await asyncio.to_thread(
        wait_for, lambda: app.audit.shipper.store_ok and stored() is not None, 10
    )
    row = stored()
    assert row is not None
    return row


@asynccontextmanager
async def slowed(
    procs: list[ManagedProcess], *, stopped_ms: float, running_ms: float
) -> AsyncIterator[None]:
    """Each process held off the CPU ``stopped_ms`` of every ``stopped_ms + running_ms``:
    a replica that answers, slowly and at a fraction of its throughput."""

    async def cycle() -> None:
        while True:
            for proc in procs:
                proc.pause()
            await asyncio.sleep(stopped_ms / 1000)
            for proc in procs:
                proc.resume()
            await asyncio.sleep(running_ms / 1000)

    task = asyncio.create_task(cycle())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        for proc in procs:
            proc.resume()
