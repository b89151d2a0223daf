"""Audit fixtures: a database of the test's own, on SQLite or the PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from core.processes import free_port
from localstack.postgres_server import start_postgres
from server.audit.record import DecisionRecord

# A server where this user may create databases: DECISION_TEST_POSTGRES_URL, else the
# machine's own on 5432 (trust auth on loopback), else one the tests start. Each test
# gets a database of its own.
MACHINE_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _admin_engine(url: str) -> sa.Engine | None:
    engine = sa.create_engine(
        url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except sa.exc.OperationalError:
        engine.dispose()
        return None
    return engine


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[sa.Engine]:
    with contextlib.ExitStack() as cleanup:
        configured = os.environ.get("DECISION_TEST_POSTGRES_URL")
        engine = _admin_engine(configured or MACHINE_POSTGRES_URL)
        if engine is None and configured:
            pytest.fail(f"PostgreSQL not reachable at DECISION_TEST_POSTGRES_URL={configured}")
        if engine is None:
            # As root the server runs as the postgres user: a folder that user can reach.
            run_dir = Path(tempfile.mkdtemp(prefix="decision-test-pg-"))
            cleanup.callback(shutil.rmtree, run_dir, ignore_errors=True)
            run_dir.chmod(0o755)
            port = free_port()
            proc = start_postgres(port, run_dir / "pg")
            cleanup.callback(proc.stop)
            engine = _admin_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
            assert engine is not None, proc.log_tail()
        cleanup.callback(engine.dispose)
        yield engine


@pytest.fixture
def postgres_url(postgres_admin: sa.Engine) -> Iterator[str]:
    name = f"audit_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield postgres_admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with postgres_admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return str(request.getfixturevalue("postgres_url"))


def decision_record(n: int = 0, **changes: object) -> DecisionRecord:
    now_us = time.time_ns() // 1000
    fields: dict[str, object] = {
        "decision_id": str(uuid.uuid4()),
        "request_id": f"req-{n}",
        "trace_id": "",
        "client_id": "tests",
        "caller": "ipv4:127.0.0.1:1",
        "server_id": "test",
        "received_at_us": now_us - 900,
        "decided_at_us": now_us,
        "symbol": "BTC-USD",
        "side": "BUY",
        "quantity": 1.0,
        "limit_price": None,
        "decision": "TRADE",
        "score": 0.75,
        "threshold": 0.55,
        "source": "PRIMARY",
        "model_name": "champion",
        "model_version": "a" * 64,
        "feature_schema_version": 1,
        "features": {"spread_bps": 2.0},
        "feature_overrides": {},
        "feature_age_ms": 3.5,
        "reason": "primary answered in 1.2 ms",
        "reason_code": "model_answered",
        "features_us": 300,
        "model_us": 1200,
        "total_us": 1600,
    }
    fields.update(changes)
    return DecisionRecord(**fields)  # type: ignore[arg-type]
