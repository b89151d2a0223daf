"""A decision server process for the locust smoke runs, shared by the module's tests, and
a runner for locust itself as a bounded subprocess."""

from __future__ import annotations

import asyncio
import csv
import functools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from core.processes import ManagedProcess, free_ports
from feature_cache.store import FeatureWriter
from localstack.health import serving
from tests.conftest import REPO, RedisInstance, Replica, server_process
from tests.server.conftest import sample_record

FRESH_SYMBOL = "BTC-USD"
STALE_SYMBOL = "STALE-USD"  # a record ten minutes old
MISSING_SYMBOL = "NOFEAT-USD"  # no record at all


@dataclass(frozen=True)
class DecisionServer:
    port: int
    run_dir: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


async def _write_features(redis_url: str, key_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        writer = FeatureWriter(client, key_prefix=key_prefix, ttl_s=600)
        await writer.write_many([sample_record(FRESH_SYMBOL)])
        await writer.write_many([sample_record(STALE_SYMBOL, age_ms=600_000.0)])
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def decision_server(
    redis_instance: RedisInstance,
    replicas: dict[str, Replica],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DecisionServer]:
    """One decision server on the session's Redis and TorchServe replicas, with fresh
    features for ``FRESH_SYMBOL`` and stale ones for ``STALE_SYMBOL``."""
    for replica in replicas.values():  # an earlier test may have broken one
        replica.ensure_running()
    run_dir = tmp_path_factory.mktemp("loadtest-server")
    key_prefix = f"loadtest{time.monotonic_ns()}:"
    [port] = free_ports(1)
    proc = server_process(
        "decision server",
        run_dir,
        port=port,
        redis_url=redis_instance.url,
        key_prefix=key_prefix,
        primary=replicas["primary"].address,
        secondary=replicas["secondary"].address,
    )
    # Written before the server starts: its feature mirror loads them with everything else.
    asyncio.run(_write_features(redis_instance.url, key_prefix))
    try:
        proc.start()
        proc.wait_ready(functools.partial(serving, port), 30.0)
        yield DecisionServer(port, run_dir)
    finally:
        proc.stop()


@dataclass(frozen=True)
class LocustRun:
    exit_code: int
    rows: dict[str, dict[str, str]]  # _stats.csv rows by Name ("Aggregated" included)
    log: str

    def count(self, name: str, column: str = "Request Count") -> int:
        row = self.rows.get(name)
        return int(row[column]) if row else 0

    def names(self, prefix: str) -> set[str]:
        return {name for name in self.rows if name.startswith(prefix)}


LOCUSTFILE = REPO / "loadtest" / "locustfile.py"


def locust(out_dir: Path, name: str, *args: str, timeout_s: float) -> tuple[int, str]:
    """Runs the locustfile with ``args`` as a subprocess in its own process group, stopped
    however it ends; its exit code and log tail."""
    proc = ManagedProcess(
        f"locust {name}",
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args],
        cwd=REPO,
        log_path=out_dir / f"{name}.log",
    )
    try:
        proc.start()
        exit_code = proc.wait(timeout_s)
    finally:
        proc.stop()
    return exit_code, proc.log_tail(60)


def run_locust(
    server: DecisionServer,
    out_dir: Path,
    scenario: str,
    *options: str,
    users: int = 2,
    run_time_s: int = 4,
) -> LocustRun:
    """A headless ``scenario`` run against ``server`` with CSV output, read back."""
    prefix = out_dir / scenario
    exit_code, log = locust(
        out_dir,
        scenario,
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{run_time_s}s",
        "--csv",
        str(prefix),
        "--host",
        server.target,
        "--scenario",
        scenario,
        # Generous: the smoke run checks behaviour, not latency, on a shared 2-core machine.
        "--deadline-ms",
        "2000",
        *options,
        timeout_s=run_time_s + 30.0,
    )
    stats = Path(f"{prefix}_stats.csv")
    assert stats.exists(), log
    with stats.open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    return LocustRun(exit_code, rows, log)
