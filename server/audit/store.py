"""The SQL audit store (SQLite by default, PostgreSQL in production) through SQLAlchemy.

The tables are defined once here; alembic's migrations create them (``server/audit/
migrations``) and a test checks that the two agree. Inserts are idempotent: a record
whose id is already stored is skipped, so a batch shipped twice does no harm.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from server.audit.record import ADMIN, CALLS, DECISION, SHADOW, AdminRecord

log = logging.getLogger(__name__)

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
    # In the key: on PostgreSQL the table is partitioned by day of it (partitions.py).
    sa.Column("decided_at", sa.DateTime(timezone=True), primary_key=True),
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
    # Exchange time of the features used (NULL when none): the realized outcome is measured
    # from it (decision_outcomes).
    sa.Column("feature_time", sa.DateTime(timezone=True)),
    # ``core.domain.Reason.label`` (NULL in records journalled before it existed): the
    # answer's reason code and decision_fallbacks_total's reason label.
    sa.Column("reason_code", sa.String(32)),
    # The questions an auditor asks: one symbol over time, one model version, one source.
    sa.Index("ix_decisions_symbol_decided_at", "symbol", "decided_at"),
    sa.Index("ix_decisions_model_version_decided_at", "model_version", "decided_at"),
    sa.Index("ix_decisions_source_decided_at", "source", "decided_at"),
    sa.Index("ix_decisions_decided_at", "decided_at"),
    sa.Index("ix_decisions_request_id", "request_id"),
    postgresql_partition_by="RANGE (decided_at)",
)

# What happened after a decision: the label its model was trained to predict, measured
# from the market data by the labeler (python -m quality) once the horizon has passed. A
# later fact about a decision, so a table of its own rather than an update of the record.
decision_outcomes = sa.Table(
    "decision_outcomes",
    metadata,
    sa.Column("decision_id", sa.String(36), primary_key=True),
    # The decision's: in the key, so that on PostgreSQL the outcomes are partitioned by the
    # same days as their decisions and archived and removed with them (partitions.py).
    sa.Column("decided_at", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("labeled_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("horizon_ms", sa.Integer, nullable=False),
    # 1: the mid moved in the side's favour by more than the half-spread, 0: it did not,
    # NULL: no label (``reason`` says why).
    sa.Column("label", sa.SmallInteger),
    sa.Column("mid_at_features", sa.Float),
    sa.Column("mid_after_horizon", sa.Float),
    sa.Column("reason", sa.Text, nullable=False),
    postgresql_partition_by="RANGE (decided_at)",
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

# The levers on-call sets (kill switches, breaker overrides, flags, the canary weight):
# their durable copy, one row holding the whole state at its version
# (``server.control.durable``). Redis holds a copy for distribution; this is the truth.
control_state = sa.Table(
    "control_state",
    metadata,
    sa.Column("id", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    # JSON object of field -> entry, as ``server.control.state.encode_entries`` writes it.
    sa.Column("entries", sa.Text, nullable=False),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
)

# The calls each server's gRPC core saw, a row a minute (``server.call_tally``): refused
# calls made no decision row, and are counted here.
call_tallies = sa.Table(
    "call_tallies",
    metadata,
    sa.Column("server_id", sa.String(128), primary_key=True),
    sa.Column("from_at", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("to_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("calls_started", sa.BigInteger, nullable=False),
    sa.Column("calls_answered", sa.BigInteger, nullable=False),
    sa.Column("calls_failed", sa.BigInteger, nullable=False),
    sa.Column("calls_refused", sa.BigInteger, nullable=False),
    sa.Index("ix_call_tallies_from_at", "from_at"),
)

_ADMIN_COLUMNS = frozenset(c.name for c in admin_actions.columns)
_CALL_TALLY_COLUMNS = frozenset(c.name for c in call_tallies.columns)
_SHADOW_FIELDS = ("decision_id", "shadow_model_name", "shadow_model_version", "shadow_score")
_UPDATE_SHADOW = (
    decisions.update()
    .where(decisions.c.decision_id == sa.bindparam("b_decision_id"))
    .values(
        shadow_model_name=sa.bindparam("shadow_model_name"),
        shadow_model_version=sa.bindparam("shadow_model_version"),
        shadow_score=sa.bindparam("shadow_score"),
    )
)


def from_us(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us / 1_000_000, tz=_UTC)


def to_us(at: dt.datetime) -> int:
    """Microseconds since the epoch of a stored time (SQLite gives it back without a
    zone: it was stored in UTC)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=_UTC)
    return round(at.timestamp() * 1_000_000)


@dataclass(frozen=True, slots=True)
class AdminActionQuery:
    """Which stored admin actions to list: times in µs (0: no bound), exact actor and
    target ("": any), at most ``limit``, newest first."""

    since_us: int = 0
    until_us: int = 0
    actor: str = ""
    target: str = ""
    limit: int = 100


def admin_row(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in record.items() if k in _ADMIN_COLUMNS}
    row["at"] = from_us(record["at_us"])
    return row


def call_tally_row(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in record.items() if k in _CALL_TALLY_COLUMNS}
    row["from_at"], row["to_at"] = from_us(record["from_us"]), from_us(record["to_us"])
    return row


def json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_store_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get their folder, WAL and NORMAL sync."""
    if url.startswith("sqlite"):
        database = sa.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, json_serializer=json_text, hide_parameters=True)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers (replay, an auditor's query) run while the shipper writes.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()
            # pysqlite begins a transaction only before DML, so DDL would commit one
            # statement at a time: a reader could see a half-migrated schema and a failed
            # migration would leave one. SQLAlchemy's recipe: the driver never begins,
            # the engine does (docs, "Serializable isolation / Savepoints / Transactional
            # DDL" for pysqlite).
            dbapi_connection.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(connection: sa.Connection) -> None:
            connection.exec_driver_sql("BEGIN")

        return engine
    # A database that vanishes without closing the connection must fail the shipper's
    # attempt (to be retried and reported), not hang it: bounded connect, TCP keepalives
    # and a bound on unacknowledged sends.
    return sa.create_engine(
        url,
        json_serializer=json_text,
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


# Decision rows go in as tuples in this order, built straight from the journal's dicts:
# SQLAlchemy's per-row parameter processing costs more than the insert itself.
DECISION_COLUMNS: tuple[str, ...] = tuple(c.name for c in decisions.columns)
_JSON_COLUMNS = frozenset({"features", "feature_overrides"})
_TIME_COLUMNS = {
    "received_at": "received_at_us",
    "decided_at": "decided_at_us",
    "feature_time": "feature_time_us",
}


def decision_values(record: Mapping[str, Any], time: Any, json: Any) -> tuple[Any, ...]:
    """One decision's column values; ``time`` and ``json`` convert those columns."""
    values = []
    for name in DECISION_COLUMNS:
        if name in _TIME_COLUMNS:
            stamp = record.get(_TIME_COLUMNS[name])
            values.append(None if stamp is None else time(stamp))
        elif name in _JSON_COLUMNS:
            value = record.get(name)
            values.append(None if value is None else json(value))
        else:
            values.append(record.get(name))
    return tuple(values)


ID_CHUNK = 500  # ids one query names at most


def held(conn: sa.Connection, column: sa.Column[str], ids: Sequence[str]) -> set[str]:
    """Those of ``ids`` that ``column`` holds, looked up ``ID_CHUNK`` at a time."""
    found: set[str] = set()
    for start in range(0, len(ids), ID_CHUNK):
        chunk = ids[start : start + ID_CHUNK]
        found.update(conn.execute(sa.select(column).where(column.in_(chunk))).scalars())
    return found


def _sqlite_time(us: int) -> str:
    # The text SQLAlchemy's SQLite DateTime stores and compares (UTC, no zone).
    return from_us(us).strftime("%Y-%m-%d %H:%M:%S.%f")


class AuditStore:
    """Idempotent batch inserts into the audit tables.

    Decisions take each database's bulk path: SQLite ``executemany``; PostgreSQL
    ``COPY`` into a temporary table, then one ``INSERT ... SELECT``. Both skip ids already
    stored (``ON CONFLICT DO NOTHING``) and raise on any other bad row. Admin actions and
    call tallies are rare and go through SQLAlchemy.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        if self.dialect == "postgresql":
            insert: Any = postgresql.insert
        elif self.dialect == "sqlite":
            insert = sqlite.insert
        else:
            raise ValueError(f"audit store: unsupported database {self.dialect!r}")
        self._insert_admin = insert(admin_actions).on_conflict_do_nothing(
            index_elements=["action_id"]
        )
        # A tally journalled again from the same start (the journal took one it reported
        # as failed) covers more calls: the longer one stays.
        tally = insert(call_tallies)
        self._insert_call_tally = tally.on_conflict_do_update(
            index_elements=["server_id", "from_at"],
            set_={c: tally.excluded[c] for c in _CALL_TALLY_COLUMNS - {"server_id", "from_at"}},
            where=call_tallies.c.to_at < tally.excluded.to_at,
        )
        # Statements built from the table definition's column names; values are bound.
        columns = ", ".join(DECISION_COLUMNS)
        marks = ", ".join("?" for _ in DECISION_COLUMNS)
        self._sqlite_insert = (
            f"INSERT INTO decisions ({columns}) VALUES ({marks})"  # noqa: S608
            " ON CONFLICT (decision_id, decided_at) DO NOTHING"
        )
        self._pg_copy = f"COPY decisions_in ({columns}) FROM STDIN"
        self._pg_merge = (
            f"INSERT INTO decisions ({columns}) SELECT {columns} FROM decisions_in"  # noqa: S608
            " ON CONFLICT (decision_id, decided_at) DO NOTHING"
        )

    def insert(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Stores decoded journal records in one transaction; returns how many were given."""
        decision_records: list[Mapping[str, Any]] = []
        admin_rows: list[dict[str, Any]] = []
        shadow_rows: list[dict[str, Any]] = []
        call_tally_rows: list[dict[str, Any]] = []
        for record in records:
            if record["kind"] == DECISION:
                decision_records.append(record)
            elif record["kind"] == ADMIN:
                admin_rows.append(admin_row(record))
            elif record["kind"] == CALLS:
                call_tally_rows.append(call_tally_row(record))
            elif record["kind"] == SHADOW:
                shadow_rows.append(
                    {
                        "b_decision_id": record["decision_id"],
                        **{k: record[k] for k in _SHADOW_FIELDS[1:]},
                    }
                )
        with self.engine.begin() as conn:
            if decision_records:
                cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                dbapi_error = self.engine.dialect.loaded_dbapi.Error
                try:
                    if self.dialect == "sqlite":
                        self._insert_sqlite(cursor, decision_records)
                    else:
                        self._insert_postgresql(cursor, decision_records)
                except dbapi_error as exc:
                    # The driver's own error, as SQLAlchemy would have raised it
                    # (IntegrityError, DataError, OperationalError, ...), without the rows.
                    raise sa.exc.DBAPIError.instance(
                        "bulk insert into decisions", None, exc, dbapi_error,
                        hide_parameters=True, dialect=self.engine.dialect,
                    ) from exc  # fmt: skip
                finally:
                    cursor.close()
            if admin_rows:
                conn.execute(self._insert_admin, admin_rows)
            if call_tally_rows:
                conn.execute(self._insert_call_tally, call_tally_rows)
            if shadow_rows:
                # After the inserts: a shadow record follows its decision in the journal,
                # so the decision's row exists, from this batch or an earlier one.
                updated = conn.execute(_UPDATE_SHADOW, shadow_rows)
                if updated.supports_sane_multi_rowcount() and updated.rowcount != len(shadow_rows):
                    log.warning(
                        "%d shadow scores found no decision row to fill",
                        len(shadow_rows) - updated.rowcount,
                    )
        return len(decision_records) + len(admin_rows) + len(shadow_rows) + len(call_tally_rows)

    def _insert_sqlite(self, cursor: Any, records: list[Mapping[str, Any]]) -> None:
        cursor.executemany(
            self._sqlite_insert, [decision_values(r, _sqlite_time, json_text) for r in records]
        )

    def _insert_postgresql(self, cursor: Any, records: list[Mapping[str, Any]]) -> None:
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS decisions_in (LIKE decisions) ON COMMIT DELETE ROWS"
        )
        with cursor.copy(self._pg_copy) as copy:
            for record in records:
                copy.write_row(decision_values(record, from_us, json_text))
        cursor.execute(self._pg_merge)

    def admin_actions(self, query: AdminActionQuery) -> list[AdminRecord]:
        """The stored admin actions ``query`` selects, newest first."""
        table = admin_actions
        statement = sa.select(table).order_by(table.c.at.desc(), table.c.action_id)
        if query.since_us > 0:
            statement = statement.where(table.c.at >= from_us(query.since_us))
        if query.until_us > 0:
            statement = statement.where(table.c.at < from_us(query.until_us))
        if query.actor:
            statement = statement.where(table.c.actor == query.actor)
        if query.target:
            statement = statement.where(table.c.target == query.target)
        with self.engine.connect() as conn:
            rows = conn.execute(statement.limit(query.limit)).mappings().all()
        return [
            AdminRecord(
                action_id=row["action_id"],
                at_us=to_us(row["at"]),
                actor=row["actor"],
                action=row["action"],
                target=row["target"],
                before=row["before"],
                after=row["after"],
                reason=row["reason"],
            )
            for row in rows
        ]

    def count_decisions(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(decisions)).scalar_one())

    def decision_ids(self, ids: Sequence[str] | None = None) -> set[str]:
        """The stored decision ids: all, or those of ``ids``."""
        column = decisions.c.decision_id
        with self.engine.connect() as conn:
            if ids is None:
                return set(conn.execute(sa.select(column)).scalars())
            return held(conn, column, ids)

    def dispose(self) -> None:
        self.engine.dispose()
