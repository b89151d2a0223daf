"""The shipper against real databases: everything arrives once, the store may go away."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import orjson
import sqlalchemy as sa

from server.audit.journal import MAGIC, Journal, frame, segment_path, segments
from server.audit.migrate import upgrade
from server.audit.record import encode
from server.audit.settings import AuditSettings
from server.audit.ship_thread import IDLE_INTERVAL_MS, AuditShipper
from server.audit.shipper import CHECKPOINT_FILE, unshipped_bytes
from server.audit.store import AuditStore, create_store_engine
from server.audit.trail import AuditTrail
from server.workers import journal_plans
from tests.conftest import REPO, wait_for
from tests.server.audit.conftest import decision_record
from tests.server.audit.proxy import TcpProxy


class Parts:
    def __init__(self, directory, url: str, segment_max_bytes: int = 64 << 10) -> None:
        self.journal = Journal(
            directory, segment_max_bytes=segment_max_bytes, fsync_interval_ms=20.0
        )
        self.journal.open()
        self.store = AuditStore(create_store_engine(url))
        self.shipper = AuditShipper(
            directory,
            self.store,
            written=lambda: self.journal.position,
            batch_records=500,
            idle_interval_ms=10.0,
            retry_max_s=0.2,
            migrate=True,
        )

    def append(self, count: int) -> list[str]:
        records = [decision_record(n) for n in range(count)]
        for record in records:
            self.journal.append([encode(record)])
        return [r.decision_id for r in records]

    def close(self) -> None:
        self.journal.close()
        self.shipper.stop(drain_timeout_s=5.0)
        self.store.dispose()


def stored_count(url: str) -> int:
    engine = create_store_engine(url)
    try:
        return AuditStore(engine).count_decisions()
    finally:
        engine.dispose()


class CountingStore(AuditStore):
    """The real store, counting its insert transactions."""

    inserts = 0

    def insert(self, records):
        self.inserts += 1
        super().insert(records)


def test_under_steady_appends_records_are_shipped_in_batches_not_one_by_one(tmp_path):
    """Two records a millisecond for half a second: the shipper takes what gathered once
    per idle interval (``IDLE_INTERVAL_MS``), not the handful that came while the last
    batch shipped (a transaction and a checkpoint each time, a thread always busy)."""
    journal = Journal(tmp_path, segment_max_bytes=64 << 20, fsync_interval_ms=1.0)
    journal.open()
    store = CountingStore(create_store_engine(f"sqlite:///{tmp_path / 'audit.db'}"))
    shipper = AuditShipper(
        tmp_path,
        store,
        written=lambda: journal.position,
        batch_records=5000,
        migrate=True,
    )
    shipper.start()
    try:
        wait_for(lambda: shipper.store_ok)
        started = time.monotonic()
        for n in range(500):
            journal.append([encode(decision_record(2 * n)), encode(decision_record(2 * n + 1))])
            time.sleep(0.001)
        appending_s = time.monotonic() - started
        wait_for(lambda: shipper.backlog_bytes() == 0)
        assert store.count_decisions() == 1000
        # One batch per idle interval while records came, and the rest (shipping each
        # handful at once made 16-19 in about 0.6 s here).
        assert store.inserts <= appending_s / (IDLE_INTERVAL_MS / 1000) + 2, (
            store.inserts,
            appending_s,
        )
    finally:
        shipper.stop(drain_timeout_s=5.0)
        journal.close()
        store.dispose()


def test_everything_is_shipped_once_and_passed_segments_are_deleted(tmp_path, database_url):
    parts = Parts(tmp_path, database_url)
    ids = parts.append(2000)
    assert len(segments(tmp_path)) > 10
    parts.shipper.start()
    wait_for(lambda: parts.shipper.backlog_bytes() == 0)
    assert parts.store.decision_ids() == set(ids)
    assert segments(tmp_path) == [parts.journal.position.segment]
    parts.close()

    # The next process: leftovers first, then its own records, nothing twice.
    again = Parts(tmp_path, database_url)
    more = again.append(10)
    again.shipper.start()
    wait_for(lambda: again.shipper.backlog_bytes() == 0)
    assert again.store.decision_ids() == set(ids) | set(more)
    again.close()


def test_records_left_by_a_killed_process_are_shipped_by_the_next(tmp_path, database_url):
    script = f"""
import os, signal
from pathlib import Path
from server.audit.journal import Journal
from server.audit.migrate import upgrade
from server.audit.record import encode
from tests.conftest import REPO, wait_for
from tests.server.audit.conftest import decision_record
journal = Journal(Path({str(tmp_path)!r}), segment_max_bytes=1 << 20, fsync_interval_ms=1000)
journal.open()
for n in range(300):
    record = decision_record(n)
    journal.append([encode(record)])
    print(record.decision_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert child.returncode == -signal.SIGKILL, child.stderr
    ids = set(child.stdout.split())
    assert len(ids) == 300

    after = Parts(tmp_path, database_url)
    after.shipper.start()
    wait_for(lambda: after.shipper.backlog_bytes() == 0)
    assert after.store.decision_ids() == ids
    after.close()


def test_a_batch_shipped_again_after_a_lost_checkpoint_does_no_harm(tmp_path, database_url):
    parts = Parts(tmp_path, database_url, segment_max_bytes=64 << 20)
    parts.append(200)
    parts.shipper.start()
    wait_for(lambda: parts.shipper.backlog_bytes() == 0)
    parts.close()
    (tmp_path / CHECKPOINT_FILE).unlink()  # as if the process died before saving it

    again = Parts(tmp_path, database_url, segment_max_bytes=64 << 20)
    again.shipper.start()
    wait_for(lambda: again.shipper.backlog_bytes() == 0)
    assert again.shipper.status().shipped_records == 200  # re-read ...
    assert again.store.count_decisions() == 200  # ... and stored once
    again.close()


def test_store_down_journal_grows_and_drains_when_it_is_back(tmp_path, postgres_url):
    url = sa.make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    parts = Parts(tmp_path, proxied)
    try:
        parts.shipper.start()
        parts.append(100)
        wait_for(lambda: parts.shipper.backlog_bytes() == 0)

        proxy.cut()
        parts.append(500)
        wait_for(lambda: not parts.shipper.status().store_ok)
        status = parts.shipper.status()
        assert status.backlog_bytes > 0
        assert status.last_error
        assert stored_count(postgres_url) == 100

        proxy.restore()
        wait_for(lambda: parts.shipper.backlog_bytes() == 0)
        assert parts.shipper.status().store_ok
        assert stored_count(postgres_url) == 600
    finally:
        parts.close()
        proxy.close()


def test_an_unreadable_record_in_a_closed_segment_skips_only_the_rest_of_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    journal_dir = tmp_path / "journal"
    parts = Parts(journal_dir, url)
    first_segment = parts.journal.position.segment
    parts.append(20)
    parts.journal._rotate()
    later = parts.append(5)
    parts.journal.close()
    path = segment_path(journal_dir, first_segment)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a record in the middle of a closed segment
    path.write_bytes(bytes(data))

    parts.shipper.start()
    wait_for(lambda: parts.shipper.backlog_bytes() == 0)
    stored = parts.store.decision_ids()
    assert set(later) <= stored
    assert 0 < len(stored) - len(later) < 20  # the records before the damage are kept
    assert parts.shipper.status().skipped_records == 1
    parts.shipper.stop(1.0)
    parts.store.dispose()


def test_records_the_store_refuses_are_set_aside_and_the_rest_ship(tmp_path, database_url):
    parts = Parts(tmp_path, database_url)
    good = parts.append(30)
    refused = [decision_record(0, symbol=None)]  # NOT NULL: no database takes it
    if database_url.startswith("postgresql"):
        refused.append(decision_record(1, model_version="f" * 65))  # longer than the column
    for record in refused:
        parts.journal.append([encode(record)])
    later = parts.append(30)
    parts.shipper.start()
    wait_for(lambda: parts.shipper.backlog_bytes() == 0)
    try:
        assert parts.store.decision_ids() == set(good) | set(later)
        status = parts.shipper.status()
        assert status.rejected_records == len(refused)
        assert status.store_ok
        kept = (tmp_path / "rejected.jsonl").read_text().splitlines()
        assert [orjson.loads(line)["record"]["decision_id"] for line in kept] == [
            r.decision_id for r in refused
        ]
    finally:
        parts.close()


async def test_a_journal_folder_no_worker_writes_any_more_is_shipped_by_an_adopter(
    tmp_path, database_url
):
    """A run with more workers left records in a folder no worker of this run owns: a
    worker adopts it, ships them beside its own, and afterwards nothing is left to adopt."""
    orphan = tmp_path / "journal" / "worker-3"
    left = Parts(orphan, database_url)
    ids = left.append(50)
    left.journal.close()  # killed: never shipped
    left.store.dispose()
    assert unshipped_bytes(orphan) > 0

    settings = AuditSettings(
        journal_dir=str(tmp_path / "journal" / "worker-0"),
        database_url=database_url,
        server_id="test/w0",
    )
    trail = AuditTrail(settings, adopted=[orphan])
    await trail.start()
    try:
        await asyncio.to_thread(wait_for, lambda: unshipped_bytes(orphan) == 0, 20)
        assert set(ids) <= trail.store.decision_ids()
    finally:
        await trail.stop()
    assert journal_plans(tmp_path / "journal", 2)[0].adopted == ()  # nothing left there


def test_nothing_past_the_writers_position_is_shipped(tmp_path):
    """Bytes past the journal's position may be a write it is cutting back after a
    failure: a whole record there is not shipped, and the record written in its place
    after the cut is."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    parts = Parts(tmp_path / "journal", url)
    upgrade(parts.store.engine)
    kept = parts.append(3)
    path = segment_path(tmp_path / "journal", parts.journal.position.segment)
    cut_back = decision_record(98)
    with path.open("ab") as file:
        file.write(frame([encode(cut_back)]))  # written whole, about to be cut
    assert parts.shipper.ship_once() == 3
    assert parts.shipper.ship_once() == 0
    with path.open("r+b") as file:
        file.truncate(parts.journal.position.offset)  # the journal's cut
    later = parts.append(1)
    assert parts.shipper.ship_once() == 1
    assert parts.store.decision_ids() == set(kept) | set(later)
    assert parts.shipper.status().skipped_records == 0
    parts.close()


def test_a_segment_past_the_writers_does_not_end_the_one_it_writes(tmp_path):
    """A failing rotation creates the next segment and deletes it again: seen in that
    moment, it must not make the shipper pass (and delete) the segment being written."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    parts = Parts(tmp_path / "journal", url)
    upgrade(parts.store.engine)
    first = parts.append(2)
    current = parts.journal.position.segment
    segment_path(tmp_path / "journal", current + 1).write_bytes(MAGIC)
    assert parts.shipper.ship_once() == 2
    assert parts.shipper.ship_once() == 0
    segment_path(tmp_path / "journal", current + 1).unlink()
    later = parts.append(2)
    assert parts.shipper.ship_once() == 2
    assert segment_path(tmp_path / "journal", current).exists()
    assert parts.store.decision_ids() == set(first) | set(later)
    parts.close()


def test_with_no_writer_a_half_written_last_record_is_left_for_the_repair(tmp_path):
    """A folder no process writes (its server died mid-write): the complete records are
    shipped and the torn one is neither shipped nor counted as damage."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    journal_dir = tmp_path / "journal"
    parts = Parts(journal_dir, url)
    ids = parts.append(3)
    path = segment_path(journal_dir, parts.journal.position.segment)
    parts.journal.close()
    with path.open("ab") as file:
        file.write(frame([encode(decision_record(99))])[:40])
    orphan = AuditShipper(
        journal_dir,
        parts.store,
        written=lambda: None,
        batch_records=500,
        idle_interval_ms=10.0,
        retry_max_s=0.2,
        migrate=False,
    )
    upgrade(parts.store.engine)
    assert orphan.ship_once() == 3
    assert orphan.ship_once() == 0
    assert orphan.status().skipped_records == 0
    assert parts.store.decision_ids() == set(ids)
    parts.store.dispose()
