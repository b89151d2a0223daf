"""The SQL audit store (SQLite by default, PostgreSQL in production) through SQLAlchemy.

The tables are defined once here; alembic's migrations create them (``server/audit/
migrations``) and a test checks that the two agree. Inserts are idempotent: a record
whose id is already stored is skipped, so a batch shipped twice does no harm.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from server.audit.record import ADMIN, DECISION

metadata = sa.MetaData()

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_UTC = dt.UTC

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("decision_id", sa.String(36), primary_key=True),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("trace_id", sa.String(32), nullable=False),
    sa.Column("client_id", sa.String(128), nullable=False),
    sa.Column("caller", sa.String(256), nullable=False),
    sa.Column("server_id", sa.String(128), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("symbol", sa.String(32), nullable=False),
    sa.Column("side", sa.String(8), nullable=False),
    sa.Column("quantity", sa.Float, nullable=False),
    sa.Column("limit_price", sa.Float),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("feature_schema_version", sa.Integer, nullable=False),
    sa.Column("features", _JSON),
    sa.Column("feature_overrides", _JSON, nullable=False),
    sa.Column("feature_age_ms", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("shadow_model_name", sa.String(64)),
    sa.Column("shadow_model_version", sa.String(64)),
    sa.Column("shadow_score", sa.Float),
    sa.Column("features_us", sa.BigInteger, nullable=False),
    sa.Column("model_us", sa.BigInteger, nullable=False),
    sa.Column("total_us", sa.BigInteger, nullable=False),
    # The questions an auditor asks: one symbol over time, one model version, one source.
    sa.Index("ix_decisions_symbol_decided_at", "symbol", "decided_at"),
    sa.Index("ix_decisions_model_version_decided_at", "model_version", "decided_at"),
    sa.Index("ix_decisions_source_decided_at", "source", "decided_at"),
    sa.Index("ix_decisions_decided_at", "decided_at"),
    sa.Index("ix_decisions_request_id", "request_id"),
)

admin_actions = sa.Table(
    "admin_actions",
    metadata,
    sa.Column("action_id", sa.String(36), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(256), nullable=False),
    sa.Column("before", _JSON, nullable=False),
    sa.Column("after", _JSON, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index("ix_admin_actions_at", "at"),
    sa.Index("ix_admin_actions_actor_at", "actor", "at"),
)

_DECISION_COLUMNS = frozenset(c.name for c in decisions.columns)
_ADMIN_COLUMNS = frozenset(c.name for c in admin_actions.columns)


def from_us(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us / 1_000_000, tz=_UTC)


def decision_row(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in record.items() if k in _DECISION_COLUMNS}
    row["received_at"] = from_us(record["received_at_us"])
    row["decided_at"] = from_us(record["decided_at_us"])
    return row


def admin_row(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in record.items() if k in _ADMIN_COLUMNS}
    row["at"] = from_us(record["at_us"])
    return row


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_store_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get their folder, WAL and NORMAL sync."""
    if url.startswith("sqlite"):
        database = sa.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, json_serializer=_json_text, hide_parameters=True)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers (replay, an auditor's query) run while the shipper writes.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

        return engine
    # A database that vanishes without closing the connection must fail the shipper's
    # attempt (to be retried and reported), not hang it: bounded connect, TCP keepalives
    # and a bound on unacknowledged sends.
    return sa.create_engine(
        url,
        json_serializer=_json_text,
        # Errors name the failure, not the audit records that were being inserted.
        hide_parameters=True,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": 5,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 30_000,
        },
    )


class AuditStore:
    """Idempotent batch inserts into the audit tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        if dialect == "postgresql":
            self._insert: Any = postgresql.insert
        elif dialect == "sqlite":
            self._insert = sqlite.insert
        else:
            raise ValueError(f"audit store: unsupported database {dialect!r}")
        self._insert_decisions = self._insert(decisions).on_conflict_do_nothing(
            index_elements=["decision_id"]
        )
        self._insert_admin = self._insert(admin_actions).on_conflict_do_nothing(
            index_elements=["action_id"]
        )

    def insert(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Stores decoded journal records in one transaction; returns how many were given."""
        decision_rows: list[dict[str, Any]] = []
        admin_rows: list[dict[str, Any]] = []
        for record in records:
            if record["kind"] == DECISION:
                decision_rows.append(decision_row(record))
            elif record["kind"] == ADMIN:
                admin_rows.append(admin_row(record))
        with self.engine.begin() as conn:
            if decision_rows:
                conn.execute(self._insert_decisions, decision_rows)
            if admin_rows:
                conn.execute(self._insert_admin, admin_rows)
        return len(decision_rows) + len(admin_rows)

    def count_decisions(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(decisions)).scalar_one())

    def decision_ids(self, ids: Sequence[str] | None = None) -> set[str]:
        """The stored decision ids: all, or those of ``ids`` (looked up in chunks)."""
        column = decisions.c.decision_id
        with self.engine.connect() as conn:
            if ids is None:
                return set(conn.execute(sa.select(column)).scalars())
            found: set[str] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                found.update(conn.execute(sa.select(column).where(column.in_(chunk))).scalars())
            return found

    def dispose(self) -> None:
        self.engine.dispose()
