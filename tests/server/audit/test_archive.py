"""The audit archive (server/audit/archive.py) on SQLite and PostgreSQL: closed days to
verified Parquet, removed after the retention, no row lost when killed at any step."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa

from quality.store import Outcome, OutcomeStore
from server.audit import archive as archive_module
from server.audit.archive import Archive, Tally, archive, restore, tally
from server.audit.migrate import upgrade
from server.audit.record import DecisionRecord, decode, encode
from server.audit.store import AuditStore, create_store_engine, decision_outcomes, decisions
from tests.server.audit.conftest import decision_record

DAY = dt.timedelta(days=1)
AFTER_S = 6 * 3600.0  # archive_after_s
TODAY = dt.datetime.now(dt.UTC).date()
# A day with a partition of its own on PostgreSQL (made ahead), and one in the table the
# migration attached.
OWN_DAY, OLD_DAY = TODAY + 2 * DAY, TODAY - 2 * DAY


def at(day: dt.date, hour: int = 12) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, tzinfo=dt.UTC)


def records(day: dt.date, count: int, first: int = 0) -> list[DecisionRecord]:
    start_us = int(at(day, 0).timestamp() * 1_000_000)
    return [
        decision_record(n, decided_at_us=start_us + n * 60_000_000 + 7)
        for n in range(first, first + count)
    ]


def insert(engine: sa.Engine, rows: list[DecisionRecord]) -> None:
    AuditStore(engine).insert([decode(encode(r)) for r in rows])


def stored_ids(engine: sa.Engine, day: dt.date) -> set[str]:
    start = at(day, 0)
    query = sa.select(decisions.c.decision_id).where(
        decisions.c.decided_at >= start, decisions.c.decided_at < start + DAY
    )
    with engine.connect() as conn:
        return set(conn.execute(query).scalars())


def tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


@pytest.fixture
def engine(database_url):
    engine = create_store_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(tmp_path) -> Archive:
    return Archive(str(tmp_path / "archive"))


def run(engine, store, now: dt.datetime, retention_days: int = 7):
    return archive(engine, store, now=now, archive_after_s=AFTER_S, retention_days=retention_days)


def test_a_closed_day_is_archived_and_verified_then_removed_after_the_retention(engine, store):
    own, old, today = records(OWN_DAY, 300), records(OLD_DAY, 200), records(OWN_DAY + DAY, 5)
    insert(engine, own + old + today)

    # OWN_DAY + 1 at 03:00: OWN_DAY ended 3 h ago, not closed yet; OLD_DAY is.
    report = run(engine, store, at(OWN_DAY + DAY, 3))
    assert report.archived == [f"decisions {OLD_DAY} part-0: 200 rows"] and not report.problems
    # A day later both are closed and archived, neither past the retention: both stay.
    report = run(engine, store, at(OWN_DAY + 2 * DAY, 5))
    assert report.archived == [f"decisions {OWN_DAY} part-0: 300 rows"] and report.removed == []
    assert stored_ids(engine, OWN_DAY) == {r.decision_id for r in own}
    assert run(engine, store, at(OWN_DAY + 2 * DAY, 5)).archived == []  # nothing again

    archived = store.read(OWN_DAY)
    assert [r["decision_id"] for r in archived] == sorted(r.decision_id for r in own)
    first = next(r for r in archived if r["decision_id"] == own[0].decision_id)
    with engine.connect() as conn:
        row = conn.execute(sa.select(decisions).where(
            decisions.c.decision_id == own[0].decision_id)).mappings().one()  # fmt: skip
    assert first["features"] == row["features"] == {"spread_bps": 2.0}
    times = archive_module.utc_times(dict(row))
    assert (first["decided_at"], first["received_at"]) == (
        times["decided_at"],
        times["received_at"],
    )
    assert {k: v for k, v in first.items() if k not in ("received_at", "decided_at")} == {
        k: v for k, v in row.items() if k not in ("received_at", "decided_at")
    }

    # Past the retention: removed (OWN_DAY's partition dropped), the archive intact; the
    # day after it is archived, not past the retention yet.
    report = run(engine, store, at(OWN_DAY + 8 * DAY, 7))
    assert report.removed[:2] == [
        f"decisions {OLD_DAY}: 200 rows",
        f"decisions {OWN_DAY}: 300 rows",
    ]
    assert stored_ids(engine, OWN_DAY) == stored_ids(engine, OLD_DAY) == set()
    assert stored_ids(engine, OWN_DAY + DAY) == {r.decision_id for r in today}
    assert f"decisions_p{OWN_DAY:%Y%m%d}" not in tables(engine)
    assert len(store.read(OWN_DAY)) == 300 and store.manifest(OWN_DAY).removed is not None


def test_killed_between_writing_and_verifying_the_day_is_written_again(engine, store, monkeypatch):
    rows = records(OWN_DAY, 50)
    insert(engine, rows)

    def killed(*_args):
        raise SystemExit("killed")

    with monkeypatch.context() as patch:
        patch.setattr(Archive, "part_tally", killed)
        with pytest.raises(SystemExit):
            run(engine, store, at(OWN_DAY + 9 * DAY))
    assert store.manifest(OWN_DAY) is None  # written, not verified
    assert stored_ids(engine, OWN_DAY) == {r.decision_id for r in rows}  # so kept

    report = run(engine, store, at(OWN_DAY + 9 * DAY))
    assert report.archived == [f"decisions {OWN_DAY} part-0: 50 rows"]
    assert report.removed[0] == f"decisions {OWN_DAY}: 50 rows"
    assert store.manifest(OWN_DAY).total == tally([r.decision_id for r in rows])


def test_killed_between_verifying_and_removing_the_day_is_removed_next_run(
    engine, store, monkeypatch
):
    rows = records(OWN_DAY, 50)
    insert(engine, rows)
    with monkeypatch.context() as patch:
        patch.setattr(archive_module, "_remove_day", lambda *_: sys.exit("killed"))
        with pytest.raises(SystemExit):
            run(engine, store, at(OWN_DAY + 9 * DAY))
    assert store.manifest(OWN_DAY).total.rows == 50  # verified
    assert stored_ids(engine, OWN_DAY) == {r.decision_id for r in rows}  # and still here

    report = run(engine, store, at(OWN_DAY + 9 * DAY))
    assert report.archived == [] and report.removed[0] == f"decisions {OWN_DAY}: 50 rows"
    assert stored_ids(engine, OWN_DAY) == set()


def test_a_day_that_changed_since_it_was_verified_is_not_removed(engine, store):
    rows = records(OWN_DAY, 20)
    insert(engine, rows)
    run(engine, store, at(OWN_DAY + 2 * DAY))  # archived, kept (retention)
    late = records(OWN_DAY, 1, first=100)
    insert(engine, late)  # into its partition, after it was verified
    report = run(engine, store, at(OWN_DAY + 9 * DAY))
    # Written again with the row, verified, then removed: nothing lost.
    assert report.archived == [f"decisions {OWN_DAY} part-0: 21 rows"]
    assert report.removed[0] == f"decisions {OWN_DAY}: 21 rows"
    assert {r["decision_id"] for r in store.read(OWN_DAY)} == {r.decision_id for r in rows + late}


def test_a_late_row_for_a_removed_day_is_kept_archived_and_a_day_restores(engine, store):
    rows = records(OWN_DAY, 30)
    insert(engine, rows)
    run(engine, store, at(OWN_DAY + 9 * DAY))  # archived and removed
    late = records(OWN_DAY, 2, first=500)
    insert(engine, [*late, rows[0]])  # two new, and one archived before (shipped again)
    assert len(stored_ids(engine, OWN_DAY)) == 3  # kept (the default partition)

    report = run(engine, store, at(OWN_DAY + 9 * DAY, 13))
    assert report.archived == [f"decisions {OWN_DAY} part-1: 2 late rows"]
    assert report.removed[0] == f"decisions {OWN_DAY}: 3 late rows (1 archived before)"
    assert stored_ids(engine, OWN_DAY) == set()
    everything = {r.decision_id for r in rows + late}
    assert {r["decision_id"] for r in store.read(OWN_DAY)} == everything
    assert store.manifest(OWN_DAY).total == tally(sorted(everything))

    assert restore(engine, store, OWN_DAY)["decisions"] == 32
    assert stored_ids(engine, OWN_DAY) == everything
    assert restore(engine, store, OWN_DAY)["decisions"] == 32  # again: nothing doubled
    assert stored_ids(engine, OWN_DAY) == everything
    assert store.manifest(OWN_DAY).removed is None  # removed again after the retention
    assert (
        run(engine, store, at(OWN_DAY + 9 * DAY, 14)).removed[0] == f"decisions {OWN_DAY}: 32 rows"
    )


def test_the_id_checksum_is_the_databases():
    ids = [r.decision_id for r in records(OWN_DAY, 1000)]
    expected = sum(int(i.replace("-", "")[-15:], 16) for i in ids)
    assert tally(ids) == Tally(1000, expected)
    assert tally(ids[:-1]) != tally(ids) != tally([*ids, ids[0]])


def test_the_command_archives_and_says_what_is_not_in_the_archive(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    insert(engine, records(TODAY - 10 * DAY, 3))
    engine.dispose()

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server.audit", "--database-url", url, *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    done = command("archive", "--archive-url", str(tmp_path / "archive"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"archived decisions {TODAY - 10 * DAY} part-0: 3 rows",
        f"removed  decisions {TODAY - 10 * DAY}: 3 rows",
    ]
    done = command("restore", str(TODAY), "--archive-url", str(tmp_path / "archive"))
    assert done.returncode == 2
    assert (
        done.stderr.strip() == f"restore: {TODAY} is not in the archive at {tmp_path / 'archive'}"
    )


def test_an_archived_day_that_lost_rows_in_the_database_is_never_archived_smaller(engine, store):
    rows = records(OWN_DAY, 10)
    insert(engine, rows)
    run(engine, store, at(OWN_DAY + 2 * DAY))  # archived, kept (retention)
    with engine.begin() as conn:
        conn.execute(decisions.delete().where(decisions.c.decision_id == rows[0].decision_id))
    report = run(engine, store, at(OWN_DAY + 9 * DAY))
    assert report.problems == [
        f"decisions {OWN_DAY}: 9 rows in the database, 10 archived; not written again"
    ]
    assert report.archived == [] and stored_ids(engine, OWN_DAY)  # nor removed
    assert len(store.read(OWN_DAY)) == 10


def labelled(engine: sa.Engine, rows: list[DecisionRecord]) -> set[str]:
    """Records an outcome for each of ``rows``, as the labeler does; their ids."""
    OutcomeStore(engine, horizon_ms=2000).record(
        [Outcome(r.decision_id, r.decided_at_us, 1, 100.0, 100.1) for r in rows],
        labeled_at_us=rows[-1].decided_at_us + 3_000_000,
    )
    return {r.decision_id for r in rows}


def outcome_ids(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(decision_outcomes.c.decision_id)).scalars())


def test_outcomes_are_archived_removed_and_restored_with_their_decisions_day(engine, store):
    rows = records(OWN_DAY, 40)
    insert(engine, rows)
    ids = labelled(engine, rows[:25])
    report = run(engine, store, at(OWN_DAY + 9 * DAY))
    assert report.archived == [
        f"decisions {OWN_DAY} part-0: 40 rows",
        f"decision_outcomes {OWN_DAY} part-0: 25 rows",
    ]
    assert report.removed[:2] == [
        f"decisions {OWN_DAY}: 40 rows",
        f"decision_outcomes {OWN_DAY}: 25 rows",
    ]
    assert outcome_ids(engine) == set()
    assert f"decision_outcomes_p{OWN_DAY:%Y%m%d}" not in tables(engine)
    archived = store.of(decision_outcomes).read(OWN_DAY)
    assert {r["decision_id"] for r in archived} == ids
    assert {r["label"] for r in archived} == {1}
    decided = {r["decision_id"]: r["decided_at"] for r in store.read(OWN_DAY)}
    assert all(r["decided_at"] == decided[r["decision_id"]] for r in archived)  # the decision's

    # An outcome written after its day left (a labeler catching up) is kept, then archived.
    late = labelled(engine, rows[25:27])
    report = run(engine, store, at(OWN_DAY + 9 * DAY, 13))
    assert report.archived == [f"decision_outcomes {OWN_DAY} part-1: 2 late rows"]
    assert outcome_ids(engine) == set()

    assert restore(engine, store, OWN_DAY) == {"decisions": 40, "decision_outcomes": 27}
    assert outcome_ids(engine) == ids | late
    assert stored_ids(engine, OWN_DAY) == {r.decision_id for r in rows}


def test_any_fsspec_filesystem_holds_the_archive(engine):
    """The archive writes, verifies, reads and restores through fsspec alone: here its
    in-memory filesystem, as S3 or GCS would be in production."""
    store = Archive(f"memory://audit-{uuid.uuid4().hex}")
    rows = records(OWN_DAY, 12)
    insert(engine, rows)
    labelled(engine, rows[:3])
    report = run(engine, store, at(OWN_DAY + 9 * DAY))
    assert not report.problems and len(report.removed) >= 2
    assert store.days() == [OWN_DAY] == store.of(decision_outcomes).days()
    assert len(store.read(OWN_DAY, ids=[rows[4].decision_id])) == 1
    assert restore(engine, store, OWN_DAY) == {"decisions": 12, "decision_outcomes": 3}


def test_a_day_is_written_in_whole_row_groups_from_many_reads(engine, store, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(archive_module, "ROW_GROUP_ROWS", 7)
    monkeypatch.setattr(archive_module, "READ_BATCH_ROWS", 5)  # SQLite: 5 rows a read
    monkeypatch.setattr(archive_module, "COPY_BUFFER_BYTES", 4096)  # COPY: a few rows a read
    rows = records(OWN_DAY, 39)
    odd = decision_record(
        39,
        decided_at_us=rows[-1].decided_at_us + 1,
        client_id='desk "7", NY — ünï',
        reason='primary failed: StatusCode.UNAVAILABLE\n  "a, b"\r\n',
    )
    rows.append(odd)
    insert(engine, rows)
    assert (
        run(engine, store, at(OWN_DAY + 2 * DAY)).archived[0]
        == f"decisions {OWN_DAY} part-0: 40 rows"
    )
    with store.fs.open(f"{store.day_dir(OWN_DAY)}/part-0.parquet", "rb") as file:
        meta = pq.ParquetFile(file).metadata
    assert [meta.row_group(n).num_rows for n in range(meta.num_row_groups)] == [7] * 5 + [5]
    assert [r["decision_id"] for r in store.read(OWN_DAY)] == sorted(r.decision_id for r in rows)
    # Quotes, commas, newlines and any text kept; an empty text is not NULL, NULL is.
    (back,) = store.read(OWN_DAY, ids=[odd.decision_id])
    assert (back["client_id"], back["reason"], back["trace_id"], back["limit_price"]) == (
        odd.client_id, odd.reason, "", None
    )  # fmt: skip
