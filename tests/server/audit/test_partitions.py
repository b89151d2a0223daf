"""The decisions and outcomes tables by day on PostgreSQL (server/audit/partitions.py,
migrations 0006 and 0007)."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest
import sqlalchemy as sa

from quality.store import Outcome, OutcomeStore
from server.audit.migrate import downgrade, upgrade
from server.audit.partitions import (
    DAYS_AHEAD,
    default_partition,
    ensure_ahead,
    partition_name,
    partitions,
)
from server.audit.record import DecisionRecord, decode, encode
from server.audit.store import (
    AuditStore,
    create_store_engine,
    decision_outcomes,
    decision_values,
    decisions,
    from_us,
    to_us,
)
from tests.server.audit.conftest import decision_record

DAY_US = 86_400_000_000
DEFAULT_PARTITION = default_partition("decisions")
COLUMNS = [c.name for c in decisions.columns]


def journalled(record: DecisionRecord) -> dict[str, object]:
    """The record as the shipper reads it from the journal."""
    return decode(encode(record))


def stored(engine: sa.Engine, table: str = "decisions") -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.text(f"SELECT decision_id FROM {table}")).scalars())  # noqa: S608


def utc_partitions(engine: sa.Engine, table: str = "decisions"):
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL TimeZone = 'UTC'"))
        return partitions(conn, table)


@pytest.fixture
def engine(postgres_url):
    engine = create_store_engine(postgres_url)
    yield engine
    engine.dispose()


def test_the_migration_partitions_a_table_in_use_without_losing_or_copying_a_row(engine):
    upgrade(engine, "0005")
    now_us = time.time_ns() // 1000
    records = [decision_record(n, decided_at_us=now_us - (n % 3) * DAY_US - n) for n in range(300)]
    rows = [decision_values(journalled(r), from_us, lambda v: v) for r in records]
    with engine.begin() as conn:  # as 0005's store held them
        conn.execute(decisions.insert(), [dict(zip(COLUMNS, row, strict=True)) for row in rows])
    upgrade(engine)

    ids = sorted(r.decision_id for r in records)
    assert stored(engine) == ids
    found = utc_partitions(engine)
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    before = f"decisions_before_{tomorrow:%Y%m%d}"
    assert [p.name for p in found] == [
        before,
        *(partition_name("decisions", tomorrow + dt.timedelta(days=n)) for n in range(DAYS_AHEAD)),
        DEFAULT_PARTITION,
    ]
    assert stored(engine, before) == ids  # attached where they were: not moved
    assert found[0].lower is None and found[-1].is_default

    # The same decisions shipped again are stored once, by the store's bulk path.
    store = AuditStore(engine)
    store.insert([journalled(r) for r in records[:10] + records[:10]])
    assert stored(engine) == ids

    downgrade(engine, "0005")  # one table again, every row in it
    assert stored(engine) == ids
    assert "decisions_default" not in sa.inspect(engine).get_table_names()


def test_a_row_no_day_covers_is_kept_and_moves_into_its_day_when_it_is_made(engine):
    upgrade(engine)
    store = AuditStore(engine)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    at_us = int(later.timestamp() * 1_000_000)
    late = decision_record(1, decided_at_us=at_us)
    store.insert([journalled(late)] * 2)
    assert stored(engine, DEFAULT_PARTITION) == [late.decision_id]

    made = ensure_ahead(engine, now=later)
    assert made == [
        partition_name(table, later.date() + dt.timedelta(days=n))
        for table in ("decisions", "decision_outcomes")
        for n in range(4)
    ]
    assert stored(engine, DEFAULT_PARTITION) == []
    assert stored(engine, partition_name("decisions", later.date())) == [late.decision_id]
    assert ensure_ahead(engine, now=later) == []  # made once
    store.insert([journalled(late)])  # and still stored once
    assert stored(engine) == [late.decision_id]


def test_outcomes_take_their_decisions_day_and_are_partitioned_without_losing_a_row(
    database_url,
):
    engine = create_store_engine(database_url)
    upgrade(engine, "0006")
    now_us = time.time_ns() // 1000
    records = [decision_record(n, decided_at_us=now_us - (n % 3) * DAY_US - n) for n in range(30)]
    AuditStore(engine).insert([journalled(r) for r in records])
    labeled_at = from_us(now_us)
    orphan = str(uuid.uuid4())  # its decision left the database before 0007
    with engine.begin() as conn:  # as 0006's labeler wrote them: no decided_at
        conn.execute(
            sa.text(
                "INSERT INTO decision_outcomes (decision_id, labeled_at, horizon_ms, label,"
                " reason) VALUES (:id, :at, 2000, 1, '')"
            ),
            [{"id": i, "at": labeled_at} for i in [*(r.decision_id for r in records), orphan]],
        )
    upgrade(engine)

    with engine.connect() as conn:
        held = dict(conn.execute(sa.select(decision_outcomes.c.decision_id,
                                           decision_outcomes.c.decided_at)).all())  # fmt: skip
    assert sorted(held) == sorted([*(r.decision_id for r in records), orphan])
    assert all(to_us(held[r.decision_id]) == r.decided_at_us for r in records)
    assert to_us(held[orphan]) == now_us  # labeled_at: the nearest time known
    if engine.dialect.name == "postgresql":
        tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
        found = [p.name for p in utc_partitions(engine, "decision_outcomes")]
        assert found[0] == f"decision_outcomes_before_{tomorrow:%Y%m%d}"
        assert found[-1] == default_partition("decision_outcomes")
        assert len(stored(engine, found[0])) == 31  # attached where they were

    # Labelled again (two labelers): stored once.
    again = [Outcome(r.decision_id, r.decided_at_us, 0) for r in records[:5]]
    OutcomeStore(engine, horizon_ms=2000).record(again, labeled_at_us=now_us + 1)
    assert len(stored(engine, "decision_outcomes")) == 31

    downgrade(engine, "0006")
    assert len(stored(engine, "decision_outcomes")) == 31
    engine.dispose()
