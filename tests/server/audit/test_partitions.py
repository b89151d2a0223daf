"""The decisions table by day on PostgreSQL (server/audit/partitions.py, migration 0006)."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import sqlalchemy as sa

from server.audit.migrate import downgrade, upgrade
from server.audit.partitions import (
    DAYS_AHEAD,
    DEFAULT_PARTITION,
    ensure_ahead,
    partition_name,
    partitions,
)
from server.audit.record import DecisionRecord, decode, encode
from server.audit.store import AuditStore, create_store_engine, decision_values, decisions, from_us
from tests.server.audit.conftest import decision_record

DAY_US = 86_400_000_000
COLUMNS = [c.name for c in decisions.columns]


def journalled(record: DecisionRecord) -> dict[str, object]:
    """The record as the shipper reads it from the journal."""
    return decode(encode(record))


def stored(engine: sa.Engine, table: str = "decisions") -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.text(f"SELECT decision_id FROM {table}")).scalars())  # noqa: S608


def utc_partitions(engine: sa.Engine):
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL TimeZone = 'UTC'"))
        return partitions(conn)


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
        *(partition_name(tomorrow + dt.timedelta(days=n)) for n in range(DAYS_AHEAD)),
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
    assert made == [partition_name(later.date() + dt.timedelta(days=n)) for n in range(4)]
    assert stored(engine, DEFAULT_PARTITION) == []
    assert stored(engine, partition_name(later.date())) == [late.decision_id]
    assert ensure_ahead(engine, now=later) == []  # made once
    store.insert([journalled(late)])  # and still stored once
    assert stored(engine) == [late.decision_id]
