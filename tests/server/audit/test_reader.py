"""One reader of recorded decisions (server/audit/reader.py): a decision or a time range
is found after its day left the database for the archive, by replay and by the labeler."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest

from core.ids import new_decision_id
from quality.store import Outcome, OutcomeStore
from server.audit.archive import Archive, archive
from server.audit.migrate import upgrade
from server.audit.reader import DecisionReader
from server.audit.record import DecisionRecord
from server.audit.store import create_store_engine
from server.audit.timeline import load_recorded
from tests.server.audit.conftest import decision_record
from tests.server.audit.test_archive import DAY, OWN_DAY, at, insert, stored_ids

pytestmark = pytest.mark.timeout(120)


def made_on(day: dt.date, count: int, **changes: object) -> list[DecisionRecord]:
    """Decisions of ``day`` with UUIDv7 ids of their time, as the server makes them."""
    rows = []
    for n in range(count):
        decided_us = int(at(day, 10).timestamp() * 1_000_000) + n * 1_000_000
        rows.append(
            decision_record(
                n,
                decision_id=uuid7_at(decided_us),
                decided_at_us=decided_us,
                feature_time_us=decided_us - 5_000,
                **changes,
            )
        )
    return rows


def uuid7_at(at_us: int) -> str:
    """A UUIDv7 made at ``at_us`` (the generator's own is made now)."""
    random_bits = int(new_decision_id().replace("-", ""), 16) & ((1 << 80) - 1)
    value = ((at_us // 1000) << 80) | random_bits
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@pytest.fixture
def stores(database_url, tmp_path):
    engine = create_store_engine(database_url)
    upgrade(engine)
    yield engine, Archive(str(tmp_path / "archive"))
    engine.dispose()


def archived_and_removed(engine, store, rows) -> None:
    insert(engine, rows)
    archive(engine, store, now=at(OWN_DAY + 9 * DAY), archive_after_s=0, retention_days=7)
    assert stored_ids(engine, OWN_DAY) == set()


def test_replay_finds_a_decision_by_id_and_by_time_after_its_day_left_the_database(
    stores, database_url, tmp_path
):
    engine, store = stores
    rows = made_on(OWN_DAY, 5, source="RULES", score=None, reason="rules: spread wide")
    legacy = decision_record(9, decided_at_us=rows[2].decided_at_us + 7)  # a uuid4 id
    archived_and_removed(engine, store, [*rows, legacy])
    reader = DecisionReader(engine, store)

    found = reader.by_ids([rows[3].decision_id, legacy.decision_id, new_decision_id()])
    assert [r["decision_id"] for r in found] == [legacy.decision_id, rows[3].decision_id]
    assert found[1]["reason"] == "rules: spread wide" and found[1]["features"]
    within = reader.between(at(OWN_DAY, 10), at(OWN_DAY, 10) + dt.timedelta(seconds=2), 10)
    assert [r["decision_id"] for r in within] == [rows[0].decision_id, rows[1].decision_id]
    assert DecisionReader(engine).by_ids([rows[3].decision_id]) == []  # no archive: gone
    loaded = load_recorded(engine, since=at(OWN_DAY, 0), until=at(OWN_DAY, 11), archive=store)
    assert [(r.source, r.reason) for r in loaded.recorded][:2] == [
        ("RULES", "rules: spread wide")
    ] * 2
    assert len(loaded.recorded) == 6 and not loaded.cut  # the timeline reads the archive too

    done = subprocess.run(
        [sys.executable, "-m", "server.audit", "--database-url", database_url, "replay",
         "--decision-id", rows[3].decision_id, "--archive-url", str(tmp_path / "archive")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "selected 1, replayed 0, differences 0"


def test_the_labeler_reads_the_pending_decisions_of_an_archived_range(stores):
    engine, store = stores
    rows = made_on(OWN_DAY, 4)
    archived_and_removed(engine, store, rows)
    outcomes = OutcomeStore(engine, horizon_ms=2000, archive=store)
    since_us = int(at(OWN_DAY, 0).timestamp() * 1_000_000)

    pending = outcomes.pending(since_us, limit=10)
    assert [p.decision_id for p in pending] == [r.decision_id for r in rows]
    assert pending[0].decided_at_us == rows[0].decided_at_us
    assert pending[0].spread_bps == 2.0

    outcomes.record([Outcome(rows[0].decision_id, rows[0].decided_at_us, 1)], since_us)
    assert [p.decision_id for p in outcomes.pending(since_us, limit=2)] == [
        r.decision_id for r in rows[1:3]
    ]
    assert OutcomeStore(engine, horizon_ms=2000).pending(since_us, limit=10) == []

    # The outcome of an archived decision is archived and removed with its day (a late
    # row of the day's outcomes); the decision is still labelled.
    report = archive(engine, store, now=at(OWN_DAY + 9 * DAY), archive_after_s=0, retention_days=7)
    assert f"decision_outcomes {OWN_DAY} part-0: 1 rows" in report.archived
    assert f"decision_outcomes {OWN_DAY}: 1 rows" in report.removed
    assert [p.decision_id for p in outcomes.pending(since_us, limit=10)] == [
        r.decision_id for r in rows[1:]
    ]
