"""Audit fixtures: a database of the test's own, on SQLite or the PostgreSQL server."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from localstack import postgres_server
from server.audit.record import DecisionRecord


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[sa.Engine]:
    """DECISION_TEST_POSTGRES_URL's server, else the machine's own, else one started."""
    with postgres_server.postgres_admin(os.environ.get("DECISION_TEST_POSTGRES_URL")) as engine:
        yield engine


@pytest.fixture
def postgres_url(postgres_admin: sa.Engine) -> Iterator[str]:
    """A database of the test's own."""
    with postgres_server.own_database(postgres_admin, "audit_test") as url:
        yield url


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
