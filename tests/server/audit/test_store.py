"""The SQL store and its migrations, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from server.audit.migrate import HEAD, alembic_config, at_head, downgrade, upgrade
from server.audit.partitions import include_name
from server.audit.record import AdminRecord, CallTallyRecord, decode, encode
from server.audit.store import (
    AuditStore,
    admin_actions,
    call_tallies,
    create_store_engine,
    decisions,
    metadata,
    to_us,
)
from tests.server.audit.conftest import decision_record


def test_migrations_create_exactly_the_tables_the_code_defines(database_url):
    engine = create_store_engine(database_url)
    try:
        upgrade(engine)
        upgrade(engine)  # already at head: nothing to do
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_name": include_name})
            differences = compare_metadata(context, metadata)
        assert differences == []
        indexes = {i["name"] for i in sa.inspect(engine).get_indexes("decisions")}
        assert {
            "ix_decisions_symbol_decided_at",
            "ix_decisions_model_version_decided_at",
            "ix_decisions_source_decided_at",
        } <= indexes
        downgrade(engine, "base")
        assert "decisions" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_the_head_is_alembics_and_a_store_at_it_is_told_without_alembic(tmp_path):
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [HEAD]
    database = tmp_path / "audit.db"
    engine = create_store_engine(f"sqlite:///{database}")
    try:
        assert not at_head(engine)
        upgrade(engine)
        assert at_head(engine)
    finally:
        engine.dispose()
    # A server's start on a store at the head: one query, no alembic import.
    code = (
        "import sys; from server.audit.migrate import upgrade;"
        " from server.audit.store import create_store_engine;"
        f" upgrade(create_store_engine('sqlite:///{database}'));"
        " sys.exit('alembic' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_migration_that_fails_leaves_the_schema_as_it_was(database_url):
    """A migration runs in one transaction on every backend, SQLite included: readers
    never see half of it, and a failure leaves the previous revision whole."""
    engine = create_store_engine(database_url)
    try:
        upgrade(engine, "0001")
        with engine.begin() as conn:
            # A table in the way of 0002's second step makes it fail after its first.
            conn.execute(sa.text("CREATE TABLE decision_outcomes (decision_id TEXT)"))
        with pytest.raises(sa.exc.DatabaseError, match="decision_outcomes"):  # that step's
            upgrade(engine)
        columns = {c["name"] for c in sa.inspect(engine).get_columns("decisions")}
        assert "feature_time" not in columns
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        assert version == "0001"
    finally:
        engine.dispose()


def test_inserts_are_idempotent_and_keep_every_field(database_url):
    engine = create_store_engine(database_url)
    upgrade(engine)
    store = AuditStore(engine)
    try:
        records = [
            decode(encode(decision_record(n, features={"spread_bps": 1.5 + n}, score=None)))
            for n in range(50)
        ]
        admin = decode(
            encode(
                AdminRecord(
                    action_id="a-1",
                    at_us=1_700_000_000_000_000,
                    actor="alice",
                    action="SetBreaker",
                    target="primary",
                    before={"mode": "AUTO"},
                    after={"mode": "FORCE_OPEN"},
                    reason="paging",
                )
            )
        )
        tally = decode(
            encode(
                CallTallyRecord(
                    server_id="pod-1:50051",
                    from_us=1_700_000_000_000_000,
                    to_us=1_700_000_060_000_000,
                    calls_started=900,
                    calls_answered=850,
                    calls_failed=2,
                    calls_refused=48,
                )
            )
        )
        longer = {**tally, "to_us": tally["to_us"] + 60_000_000, "calls_refused": 50}
        store.insert([*records, admin, longer])
        store.insert([*records[:20], admin, tally])  # shipped again after a crash
        assert store.count_decisions() == 50
        with engine.connect() as conn:
            row = (
                conn.execute(sa.select(decisions).where(decisions.c.request_id == "req-7"))
                .mappings()
                .one()
            )
            actions = conn.execute(sa.select(admin_actions.c.actor, admin_actions.c.after)).all()
            tallies = conn.execute(sa.select(call_tallies)).mappings().all()
        assert row["features"] == {"spread_bps": 8.5}
        assert row["score"] is None
        assert row["model_version"] == "a" * 64
        assert row["source"] == "PRIMARY"
        assert row["reason_code"] == "model_answered"
        assert actions == [("alice", {"mode": "FORCE_OPEN"})]
        # A tally journalled twice from one start (the journal took one it reported as
        # failed): the one that covers more stays, whichever is shipped last.
        assert [(t["server_id"], t["calls_started"], t["calls_refused"]) for t in tallies] == [
            ("pod-1:50051", 900, 50)
        ]
        assert to_us(tallies[0]["to_at"]) - to_us(tallies[0]["from_at"]) == 120_000_000
    finally:
        store.dispose()
