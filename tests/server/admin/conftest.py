"""Admin fixtures: the audit store's databases (SQLite, PostgreSQL) hold the control state;
a redis-server of the test's own may be flushed and restarted empty."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.processes import ManagedProcess, free_port
from localstack.redis_server import start_redis
from tests.server.audit.conftest import database_url, postgres_admin, postgres_url

__all__ = ["OwnRedis", "database_url", "own_redis", "postgres_admin", "postgres_url"]


class OwnRedis:
    """A redis-server of the test's own, which it may flush and restart (empty)."""

    def __init__(self, run_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._run_dir = run_dir
        self.proc: ManagedProcess = start_redis(self.port, run_dir)

    def restart_empty(self) -> None:
        self.proc.stop()
        self.proc = start_redis(self.port, self._run_dir)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    redis = OwnRedis(tmp_path / "redis")
    try:
        yield redis
    finally:
        redis.proc.stop()
