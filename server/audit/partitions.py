"""The daily partitions of the tables that grow with decisions, on PostgreSQL.

``decisions`` and ``decision_outcomes`` are each partitioned by range of ``decided_at``
(an outcome's is its decision's), a partition a UTC day (``decisions_pYYYYMMDD``,
``decision_outcomes_pYYYYMMDD``), beside two others:

- the table that held the rows before partitioning, attached by its migration (0006,
  0007) as the partition of everything before the day after the migration ran (its rows
  stay in place; it is archived day by day like any other);
- the default partition (``decisions_default``), for a row no day covers: a late row for
  a day already archived and dropped, or a day not made yet. No row is ever refused.

``ensure_ahead`` makes today's partition and the next ``DAYS_AHEAD`` days' (``migrate``,
each shipper once an hour, the archive job); a day's rows already in the default partition
move into its new partition in the same transaction. SQLite is not partitioned.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

# The tables partitioned by day of decided_at, each with the same layout of partitions.
TABLES = ("decisions", "decision_outcomes")
# Days made ahead of today: a long weekend without the archive job still finds its days.
DAYS_AHEAD = 3
# pg_advisory_xact_lock's key: the shippers of a fleet making the same partition wait in
# turn instead of failing on each other's CREATE TABLE ("dpar" in ASCII).
_LOCK_KEY = 0x64706172
_DAY = dt.timedelta(days=1)
_BOUND = re.compile(r"FOR VALUES FROM \((.+?)\) TO \((.+?)\)")


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition of a table: rows with ``lower <= decided_at < upper``; ``lower``
    None: from the beginning (the table partitioned by the migration); both None: the
    default partition."""

    name: str
    lower: dt.datetime | None
    upper: dt.datetime | None

    @property
    def is_default(self) -> bool:
        return self.upper is None

    def covers(self, day: dt.date) -> bool:
        """Whether the whole UTC ``day`` falls in this partition (never the default)."""
        start = day_start(day)
        return (
            self.upper is not None
            and (self.lower is None or self.lower <= start)
            and start + _DAY <= self.upper
        )


def default_partition(table: str) -> str:
    return f"{table}_default"


def is_partition(name: str) -> bool:
    """Whether ``name`` is one of the partitions (made here, not by the migrations' code:
    alembic's comparisons leave them out)."""
    return any(
        name == default_partition(table) or name.startswith((f"{table}_p", f"{table}_before_"))
        for table in TABLES
    )


def include_name(name: str | None, kind: str, _parents: object) -> bool:
    """alembic's ``include_name`` hook: every name but the partitions'."""
    return kind != "table" or name is None or not is_partition(name)


def day_start(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def partition_name(table: str, day: dt.date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def _bound(text: str) -> dt.datetime | None:
    if text == "MINVALUE":
        return None
    return dt.datetime.fromisoformat(text.strip("'")).astimezone(dt.UTC)


def is_partitioned(conn: Connection, table: str) -> bool:
    found = conn.execute(
        sa.text("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(:t)"),
        {"t": table},
    )
    return found.first() is not None


def partitions(conn: Connection, table: str) -> list[Partition]:
    """The partitions of ``table``, the oldest first and the default last (in a
    transaction whose TimeZone is UTC: bounds are printed in it)."""
    rows = conn.execute(
        sa.text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": table},
    )
    found = []
    for name, bound in rows:
        match = _BOUND.fullmatch(bound)
        if match is None:  # DEFAULT
            found.append(Partition(name, None, None))
        else:
            found.append(Partition(name, _bound(match[1]), _bound(match[2])))
    oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
    return sorted(found, key=lambda p: (p.is_default, p.lower or oldest))


def ensure_ahead(engine: Engine, now: dt.datetime | None = None) -> list[str]:
    """Makes the partitions of today (UTC, of ``now``) and the ``DAYS_AHEAD`` days after it
    that are missing, of each partitioned table; returns their names (none on SQLite, or
    before the migration that partitions a table)."""
    if engine.dialect.name != "postgresql":
        return []
    today = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).date()
    wanted = [today + n * _DAY for n in range(DAYS_AHEAD + 1)]
    made = []
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL TimeZone = 'UTC'"))
        tables = [t for t in TABLES if is_partitioned(conn, t) and _missing(conn, t, wanted)]
        if not tables:
            return []
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        for table in tables:
            for day in _missing(conn, table, wanted):  # again, now no one else makes them
                _make(conn, table, day)
                made.append(partition_name(table, day))
    return made


def ensure_day(engine: Engine, day: dt.date) -> None:
    """Makes ``day``'s partition of each partitioned table when none covers it (an
    archived day restored)."""
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL TimeZone = 'UTC'"))
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        for table in TABLES:
            if is_partitioned(conn, table) and _missing(conn, table, [day]):
                _make(conn, table, day)


def drop_empty(engine: Engine, before: dt.date) -> list[str]:
    """Drops the partitions that end by the start of ``before`` and hold no row (days made
    ahead that nothing was decided on, the migrated table once its days are archived and
    removed); the default partition stays. Returns what it dropped."""
    if engine.dialect.name != "postgresql":
        return []
    dropped = []
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL TimeZone = 'UTC'"))
        for table in (t for t in TABLES if is_partitioned(conn, t)):
            for partition in partitions(conn, table):
                if partition.upper is None or partition.upper > day_start(before):
                    continue
                conn.execute(sa.text(f"LOCK TABLE {partition.name} IN ACCESS EXCLUSIVE MODE"))
                held = conn.execute(sa.text(f"SELECT 1 FROM {partition.name} LIMIT 1")).first()  # noqa: S608
                if held is None:
                    conn.execute(sa.text(f"DROP TABLE {partition.name}"))
                    dropped.append(f"{partition.name}: empty")
    return dropped


def _missing(conn: Connection, table: str, days: list[dt.date]) -> list[dt.date]:
    existing = partitions(conn, table)
    return [day for day in days if not any(p.covers(day) for p in existing)]


def _make(conn: Connection, table: str, day: dt.date) -> None:
    """``day``'s partition of ``table``, with the rows its default partition holds for it:
    the default partition is locked first, so that no row for the day lands there
    meanwhile."""
    name = partition_name(table, day)
    default = default_partition(table)
    bounds = {"lower": day_start(day), "upper": day_start(day) + _DAY}
    conn.execute(sa.text(f"LOCK TABLE {default} IN SHARE ROW EXCLUSIVE MODE"))
    conn.execute(
        sa.text(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    )
    conn.execute(
        sa.text(
            f"WITH moved AS (DELETE FROM {default}"  # noqa: S608 - our own names
            " WHERE decided_at >= :lower AND decided_at < :upper RETURNING *)"
            f" INSERT INTO {name} SELECT * FROM moved"
        ),
        bounds,
    )
    conn.execute(
        sa.text(
            f"ALTER TABLE {table} ATTACH PARTITION {name}"
            f" FOR VALUES FROM ('{bounds['lower'].isoformat()}')"
            f" TO ('{bounds['upper'].isoformat()}')"
        )
    )
