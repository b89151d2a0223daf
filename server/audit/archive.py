"""The audit archive: each closed day of decisions and of their outcomes as Parquet,
verified against the database, then removed from it once older than the retention.

``python -m server.audit archive`` (a CronJob in Kubernetes) runs ``archive``. The archive
is a folder by default and any fsspec URL in production; under it, for each table that
grows with decisions (``TABLES``: ``decisions``, ``decision_outcomes``)::

    decisions/v1/day=2026-11-30/part-0.parquet   the day's rows, sorted by decision_id
    decisions/v1/day=2026-11-30/part-1.parquet   rows that came after the day was dropped
    decisions/v1/day=2026-11-30/manifest.json    each part's rows and id checksum
    decision_outcomes/v1/day=2026-11-30/...      the same, of the outcomes of the day's
                                                 decisions (by their decided_at)

A day is archived once it is closed (``archive_after_s`` past its end: room for the
backlog a shipper delivers after a store outage); its part is written under a temporary
name, moved into place, read back, and only when its row count and id checksum equal the
database's is the manifest written: the manifest is what says a part is verified. The day
is removed from the database (its partition dropped; on SQLite and in a partition of
several days, its rows deleted) once it is older than ``retention_days``, in a
transaction that checks the database still holds exactly what the manifest says. A row
that arrives for a removed day (kept in the default partition) is archived as the day's
next part and then deleted; one already archived (shipped twice) is only deleted.

Killed at any step, every row is in the database or in a verified part: the next run
writes a part without a manifest entry again, and removes what was verified.
``restore`` puts an archived day back into the database.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import posixpath
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from server.audit import partitions
from server.audit.store import decision_outcomes, decisions, json_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # in the path and in each file's metadata; a new layout is v2 beside it
# Rows a Parquet row group holds: ~40 MB of the real record before compression, what a
# read by id decompresses, and what bounds the job's memory (200,000: 1.8x the peak).
ROW_GROUP_ROWS = 50_000
READ_BATCH_ROWS = 50_000  # rows fetched from the database at a time: bounded memory
COPY_BUFFER_BYTES = 4 << 20  # COPY's CSV read and parsed this much at a time
_DAY = dt.timedelta(days=1)
# The tables archived and removed day by day, each under a folder of its name: the decisions
# and their outcomes (partitions.TABLES on PostgreSQL).
TABLES = (decisions, decision_outcomes)


def arrow_schema(table: sa.Table) -> Any:
    """The archive's schema of ``table``, from its columns: JSON columns as JSON text,
    times as UTC microseconds."""
    import pyarrow as pa

    types = {
        sa.String: pa.string(), sa.Text: pa.string(), sa.JSON: pa.string(),
        sa.Float: pa.float64(), sa.BigInteger: pa.int64(), sa.Integer: pa.int32(),
        sa.SmallInteger: pa.int16(), sa.DateTime: pa.timestamp("us", tz="UTC"),
    }  # fmt: skip
    fields = []
    for column in table.columns:
        kind = next(t for cls, t in types.items() if isinstance(column.type, cls))
        fields.append(pa.field(column.name, kind, nullable=bool(column.nullable)))
    return pa.schema(fields, metadata={b"decision.archive.schema": str(SCHEMA_VERSION).encode()})


@dataclass(frozen=True, slots=True)
class Tally:
    """What a set of rows is checked by: their count and the sum of their ids' last 60
    bits (order-free, and any missing or doubled row changes it)."""

    rows: int = 0
    id_sum: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.rows + other.rows, self.id_sum + other.id_sum)


_NIBBLE = np.zeros(256, dtype=np.uint64)
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint64)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint64)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint64)
# The id's last 15 hex digits: 3 of its fourth group, all 12 of its fifth.
_TAIL = np.array([20, 21, 22, *range(24, 36)])


def tally(ids: Sequence[str]) -> Tally:
    """The ``Tally`` of canonical UUID strings, vectorised (a day is millions of ids)."""
    if not ids:
        return Tally()
    chars = np.frombuffer(np.array(ids, dtype="S36").tobytes(), np.uint8).reshape(-1, 36)
    nibbles = _NIBBLE[chars[:, _TAIL]]
    high = (nibbles[:, :8] << np.arange(28, -1, -4, dtype=np.uint64)).sum(axis=1)
    low = (nibbles[:, 8:] << np.arange(24, -1, -4, dtype=np.uint64)).sum(axis=1)
    return Tally(len(ids), (int(high.sum()) << 28) + int(low.sum()))


def day_of(at: dt.datetime) -> dt.date:
    return (at if at.tzinfo else at.replace(tzinfo=dt.UTC)).astimezone(dt.UTC).date()


@dataclass
class Manifest:
    """A day's verified parts: file name -> its ``Tally``; ``removed``: when the day left
    the database (None while it is there)."""

    day: dt.date
    parts: dict[str, Tally] = field(default_factory=dict)
    removed: str | None = None

    @property
    def total(self) -> Tally:
        return sum(self.parts.values(), Tally())

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "day": self.day.isoformat(),
                # As text: a day's sum passes 64 bits, JSON's integers do not.
                "parts": {
                    n: {"rows": t.rows, "id_sum": str(t.id_sum)} for n, t in self.parts.items()
                },
                "removed": self.removed,
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        raw = orjson.loads(data)
        parts = {n: Tally(p["rows"], int(p["id_sum"])) for n, p in raw["parts"].items()}
        return cls(dt.date.fromisoformat(raw["day"]), parts, raw.get("removed"))


def json_columns(table: sa.Table) -> list[str]:
    return [c.name for c in table.columns if isinstance(c.type, sa.JSON)]


class Archive:
    """The archive at ``url`` (a folder or an fsspec URL) of one of ``TABLES``."""

    def __init__(self, url: str, table: sa.Table = decisions) -> None:
        self.url, self.table = url, table
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = posixpath.join(root, table.name, f"v{SCHEMA_VERSION}")

    def of(self, table: sa.Table) -> Archive:
        """The archive of ``table`` beside this one."""
        return self if table is self.table else Archive(self.url, table)

    def day_dir(self, day: dt.date) -> str:
        return posixpath.join(self.root, f"day={day.isoformat()}")

    def days(self) -> list[dt.date]:
        """The days with a manifest, oldest first."""
        if not self.fs.exists(self.root):
            return []
        found = []
        for path in self.fs.ls(self.root, detail=False):
            name = posixpath.basename(path.rstrip("/"))
            if name.startswith("day=") and self.fs.exists(posixpath.join(path, "manifest.json")):
                found.append(dt.date.fromisoformat(name[4:]))
        return sorted(found)

    def manifest(self, day: dt.date) -> Manifest | None:
        path = posixpath.join(self.day_dir(day), "manifest.json")
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as file:
            return Manifest.from_json(file.read())

    def write_manifest(self, manifest: Manifest) -> None:
        self._put(posixpath.join(self.day_dir(manifest.day), "manifest.json"), manifest.to_json())

    def _put(self, path: str, data: bytes) -> None:
        """Written whole or not at all: under a temporary name, then moved into place."""
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with self.fs.open(temporary, "wb") as file:
            file.write(data)
        self.fs.mv(temporary, path)

    def write_part(self, day: dt.date, name: str, batches: Iterable[Any]) -> None:
        """Writes Arrow record batches of the table's schema, in decision_id order, as part
        ``name``, in row groups of ``ROW_GROUP_ROWS``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = arrow_schema(self.table)
        path = posixpath.join(self.day_dir(day), name)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with (
            self.fs.open(temporary, "wb") as file,
            pq.ParquetWriter(file, schema, compression="zstd") as writer,
        ):
            pending: list[Any] = []
            held = 0
            for batch in batches:
                pending.append(batch)
                held += batch.num_rows
                if held >= ROW_GROUP_ROWS:  # whole row groups out, the rest kept
                    rows = pa.Table.from_batches(pending, schema)
                    whole = held - held % ROW_GROUP_ROWS
                    writer.write_table(rows.slice(0, whole), row_group_size=ROW_GROUP_ROWS)
                    pending, held = rows.slice(whole).to_batches(), held - whole
            if held:
                writer.write_table(pa.Table.from_batches(pending, schema))
        self.fs.mv(temporary, path)

    def part_tally(self, day: dt.date, name: str) -> Tally:
        """The ``Tally`` of part ``name`` as read back from the archive."""
        import pyarrow.parquet as pq

        total = Tally()
        with self.fs.open(posixpath.join(self.day_dir(day), name), "rb") as file:
            for batch in pq.ParquetFile(file).iter_batches(
                batch_size=READ_BATCH_ROWS, columns=["decision_id"]
            ):
                total = total + tally(batch.column(0).to_pylist())
        return total

    def read(
        self,
        day: dt.date,
        ids: Sequence[str] | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        columns: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """The day's verified rows as the database gives them (JSON decoded): those of
        ``ids``, decided in ``[since, until)``, or all; only ``columns`` if given. Row
        groups whose id or time range holds none are skipped (UUIDv7 ids sorted are in time
        order too)."""
        import pyarrow.dataset as ds

        manifest = self.manifest(day)
        if manifest is None:
            return []
        paths = [posixpath.join(self.day_dir(day), name) for name in manifest.parts]
        dataset = ds.dataset(
            paths, schema=arrow_schema(self.table), format="parquet", filesystem=self.fs
        )
        where = ds.scalar(True)
        if ids is not None:
            where = where & ds.field("decision_id").isin(list(ids))
        if since is not None:
            where = where & (ds.field("decided_at") >= since)
        if until is not None:
            where = where & (ds.field("decided_at") < until)
        table = dataset.to_table(columns=None if columns is None else list(columns), filter=where)
        rows: list[dict[str, Any]] = table.to_pylist()
        encoded = [name for name in json_columns(self.table) if name in table.column_names]
        for row in rows:
            for name in encoded:
                if row[name] is not None:
                    row[name] = orjson.loads(row[name])
        return rows


def utc_times(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its times in UTC (SQLite hands them back naive, in UTC)."""
    for name, value in row.items():
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            row[name] = value.replace(tzinfo=dt.UTC)
    return row


def _in_day(table: Any, day: dt.date) -> Any:
    start = partitions.day_start(day)
    return sa.and_(table.c.decided_at >= start, table.c.decided_at < start + _DAY)


def db_tally(conn: Connection, day: dt.date, table: Any = decisions) -> Tally:
    """The ``Tally`` of the database's rows of ``day`` in ``table`` (one of ``TABLES``, or
    one partition of it)."""
    where = _in_day(table, day)
    if conn.dialect.name == "postgresql":
        tail = sa.text("('x' || right(replace(decision_id, '-', ''), 15))::bit(60)::bigint")
        row = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(tail), 0))
            .select_from(table)
            .where(where)
        ).one()
        return Tally(int(row[0]), int(row[1]))
    total = Tally()
    result = conn.execute(sa.select(table.c.decision_id).where(where)).scalars()
    for chunk in result.partitions(READ_BATCH_ROWS):
        total = total + tally(chunk)
    return total


def _batches(engine: Engine, table: sa.Table, day: dt.date) -> Iterator[Any]:
    """The day's rows of ``table`` in decision_id order, as Arrow record batches of the
    archive's schema: on PostgreSQL from COPY's CSV, parsed by Arrow (no Python object a
    value: a fleet's day is hundreds of millions of rows), elsewhere from ``_rows``."""
    import pyarrow as pa

    if engine.dialect.name != "postgresql":
        for rows in _rows(engine, table, day):
            yield _arrow(table, rows)
        return
    import pyarrow.csv as csv

    schema = arrow_schema(table)
    start = partitions.day_start(day)
    bounds = (start.isoformat(), (start + _DAY).isoformat())
    times = {c.name for c in table.columns if isinstance(c.type, sa.DateTime)}
    encoded = json_columns(table)
    selected = ", ".join(
        f"(extract(epoch FROM {name}) * 1000000)::bigint" if name in times else f"{name}::text"
        if name in encoded else name
        for name in schema.names
    )  # fmt: skip
    copy = (
        f"COPY (SELECT {selected} FROM {table.name}"  # noqa: S608 - our names, our dates
        f" WHERE decided_at >= '{bounds[0]}' AND decided_at < '{bounds[1]}'"
        ' ORDER BY decision_id COLLATE "C") TO STDOUT WITH (FORMAT csv)'
    )
    # Times come as µs integers; an empty unquoted field is NULL, a quoted one "" is text.
    read_types = {f.name: pa.int64() if f.name in times else f.type for f in schema}
    options = csv.ConvertOptions(
        column_types=read_types, strings_can_be_null=True, quoted_strings_can_be_null=False
    )
    with engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(copy) as stream:
            source = io.BufferedReader(_CopyStream(stream), buffer_size=COPY_BUFFER_BYTES)
            reader = csv.open_csv(
                source,
                # Quoted values may hold newlines (a model server's error in a reason).
                parse_options=csv.ParseOptions(newlines_in_values=True),
                read_options=csv.ReadOptions(
                    column_names=schema.names, block_size=COPY_BUFFER_BYTES
                ),
                convert_options=options,
            )
            for batch in reader:
                yield batch.cast(schema)


class _CopyStream(io.RawIOBase):
    """psycopg's COPY TO STDOUT chunks as a file Arrow reads."""

    def __init__(self, copy: Any) -> None:
        self._copy = copy
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            chunk = self._copy.read()
            if not chunk:
                return 0
            self._left = memoryview(chunk)
        size = min(len(buffer), len(self._left))
        buffer[:size] = self._left[:size]
        self._left = self._left[size:]
        return size


def _arrow(table: sa.Table, rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    return pa.RecordBatch.from_pylist(rows, schema=arrow_schema(table))


def _rows(engine: Engine, table: sa.Table, day: dt.date) -> Iterator[list[dict[str, Any]]]:
    """The day's rows of ``table`` in decision_id order, in batches, as the archive stores
    them (JSON columns as text)."""
    query = sa.select(table).where(_in_day(table, day)).order_by(table.c.decision_id)
    encoded = json_columns(table)
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=READ_BATCH_ROWS).execute(
            query
        )
        for chunk in result.mappings().partitions():
            rows = [utc_times(dict(row)) for row in chunk]
            for row in rows:
                for name in encoded:
                    row[name] = None if row[name] is None else json_text(row[name])
            yield rows


@dataclass
class Report:
    """What a run did, day by day."""

    archived: list[str] = field(default_factory=list)  # "2026-11-29 part-0: 1,234 rows"
    removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def closed_before(now: dt.datetime, archive_after_s: float) -> dt.date:
    """The first day that is not closed at ``now``: every earlier day has ended at least
    ``archive_after_s`` ago."""
    return day_of(now - dt.timedelta(seconds=archive_after_s))


def db_days(engine: Engine, table: sa.Table, before: dt.date) -> list[dt.date]:
    """The days before ``before`` with rows of ``table`` in the database, oldest first."""
    column = table.c.decided_at
    with engine.connect() as conn:
        first = conn.execute(sa.select(sa.func.min(column))).scalar()
        if first is None:
            return []
        days, day = [], day_of(first)
        while day < before:
            start = partitions.day_start(day)
            found = conn.execute(
                sa.select(column).where(column >= start, column < start + _DAY).limit(1)
            ).first()
            if found is not None:
                days.append(day)
                day += _DAY
            else:  # jump to the next row's day
                after = conn.execute(sa.select(sa.func.min(column)).where(column >= start)).scalar()
                if after is None:
                    break
                day = day_of(after)
        return days


def archive(
    engine: Engine,
    store: Archive,
    *,
    now: dt.datetime | None = None,
    archive_after_s: float,
    retention_days: int,
) -> Report:
    """Archives every closed day the database holds of each of ``TABLES`` and removes the
    days past the retention; see the module docstring. Report lines start with the
    table's name."""
    now = now or dt.datetime.now(dt.UTC)
    partitions.ensure_ahead(engine, now)
    report = Report()
    remove_before = day_of(now) - dt.timedelta(days=retention_days)
    for table in TABLES:
        kept = store.of(table)
        for day in db_days(engine, table, closed_before(now, archive_after_s)):
            manifest = kept.manifest(day) or Manifest(day)
            if manifest.removed is not None:
                _archive_late(engine, kept, manifest, report)
            elif not _archive_day(engine, kept, manifest, report):
                continue  # not verified as the database holds it: not removed either
            if manifest.removed is None and day < remove_before and manifest.parts:
                _remove_day(engine, kept, manifest, report)
    report.removed += partitions.drop_empty(engine, before=remove_before)
    return report


def _archive_day(engine: Engine, store: Archive, manifest: Manifest, report: Report) -> bool:
    """(Re)writes the day's part-0 from the database unless the manifest already says
    exactly what the database holds; whether it does now."""
    day, table = manifest.day, store.table
    with engine.connect() as conn:
        held = db_tally(conn, day, table)
    if manifest.total == held:
        return True
    if held.rows < manifest.total.rows:  # rows left the database some other way: keep both
        report.problems.append(f"{table.name} {day}: {held.rows:,} rows in the database, "
                               f"{manifest.total.rows:,} archived; not written again")  # fmt: skip
        return False
    store.write_part(day, "part-0.parquet", _batches(engine, table, day))
    written = store.part_tally(day, "part-0.parquet")
    with engine.connect() as conn:
        held = db_tally(conn, day, table)
    if written != held:  # rows arrived meanwhile: the next run writes it again
        report.problems.append(f"{table.name} {day} part-0: {written.rows:,} rows written, "
                               f"{held.rows:,} in the database now; again next run")  # fmt: skip
        return False
    manifest.parts = {"part-0.parquet": written}
    store.write_manifest(manifest)
    report.archived.append(f"{table.name} {day} part-0: {written.rows:,} rows")
    return True


def _remove_day(engine: Engine, store: Archive, manifest: Manifest, report: Report) -> None:
    day, table = manifest.day, store.table
    with engine.begin() as conn:
        own = _own_partition(conn, table, day)
        if own is not None:
            conn.execute(sa.text(f"LOCK TABLE {own} IN ACCESS EXCLUSIVE MODE"))
        held = db_tally(conn, day, table)
        if held != manifest.total:  # not what was verified: archived again first
            report.problems.append(
                f"{table.name} {day}: the database no longer matches its manifest"
            )
            return
        if own is not None:
            conn.execute(sa.text(f"DROP TABLE {own}"))
        else:
            conn.execute(table.delete().where(_in_day(table, day)))
    manifest.removed = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    store.write_manifest(manifest)
    report.removed.append(f"{table.name} {day}: {held.rows:,} rows")


def _own_partition(conn: Connection, table: sa.Table, day: dt.date) -> str | None:
    """The name of ``day``'s own partition of ``table`` (PostgreSQL), None when it has
    none."""
    if conn.dialect.name != "postgresql":
        return None
    conn.execute(sa.text("SET LOCAL TimeZone = 'UTC'"))
    for partition in partitions.partitions(conn, table.name):
        if partition.lower == partitions.day_start(day) and partition.covers(day):
            return partition.name
    return None


def _archive_late(engine: Engine, store: Archive, manifest: Manifest, report: Report) -> None:
    """Rows of a day already removed (late, or shipped again): those not archived yet go
    into the day's next part; then all are deleted."""
    day, table = manifest.day, store.table
    rows = [row for batch in _rows(engine, table, day) for row in batch]
    ids = [row["decision_id"] for row in rows]
    archived = {row["decision_id"] for row in store.read(day, ids, columns=["decision_id"])}
    new = [row for row in rows if row["decision_id"] not in archived]
    if new:
        part = f"part-{len(manifest.parts)}"
        name = f"{part}.parquet"
        store.write_part(day, name, [_arrow(table, new)])
        written = store.part_tally(day, name)
        if written != tally([row["decision_id"] for row in new]):
            report.problems.append(
                f"{table.name} {day} {part}: what was read back differs; again next run"
            )
            return
        manifest.parts[name] = written
        store.write_manifest(manifest)
        report.archived.append(f"{table.name} {day} {part}: {written.rows:,} late rows")
    with engine.begin() as conn:
        conn.execute(table.delete().where(table.c.decision_id.in_(ids), _in_day(table, day)))
    report.removed.append(
        f"{table.name} {day}: {len(ids):,} late rows ({len(ids) - len(new):,} archived before)"
    )


def restore(engine: Engine, store: Archive, day: dt.date) -> dict[str, int]:
    """Puts an archived day's rows of each of ``TABLES`` back into the database (a row
    already there is left as it is); returns how many the archive holds, by table. The day
    is removed again once the next run finds it past the retention."""
    from sqlalchemy.dialects import postgresql, sqlite

    partitions.ensure_day(engine, day)
    insert: Any = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    restored = {}
    for table in TABLES:
        kept = store.of(table)
        rows = kept.read(day)
        statement = insert(table).on_conflict_do_nothing(
            index_elements=["decision_id", "decided_at"]
        )
        with engine.begin() as conn:
            for start in range(0, len(rows), READ_BATCH_ROWS):
                conn.execute(statement, rows[start : start + READ_BATCH_ROWS])
        manifest = kept.manifest(day)
        if manifest is not None and manifest.removed is not None:
            manifest.removed = None
            kept.write_manifest(manifest)
        restored[table.name] = len(rows)
    return restored
