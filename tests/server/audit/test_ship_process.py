"""The shipper's process: it ships, it is started again when it dies, and it never
outlives its server by more than the drain."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server.audit.journal import Journal
from server.audit.record import encode
from server.audit.settings import AuditSettings
from server.audit.ship_child import LOCK_FILE
from server.audit.ship_process import ShipperProcess
from server.audit.store import AuditStore, create_store_engine
from tests.conftest import REPO, wait_for
from tests.server.audit.conftest import decision_record

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    """Running (a zombie waiting for whoever adopted it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stored_ids(url: str) -> set[str]:
    engine = create_store_engine(url)
    try:
        return AuditStore(engine).decision_ids()
    except Exception:  # noqa: BLE001 - the shipper has not created the tables yet
        return set()
    finally:
        engine.dispose()


def test_a_shipper_process_that_dies_is_started_again_and_ships_the_rest(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    journal = Journal(tmp_path / "journal", segment_max_bytes=1 << 20, fsync_interval_ms=0)
    journal.open()
    settings = AuditSettings(database_url=url)
    shipper = ShipperProcess(journal, settings, migrate=True, log_level="INFO", log_format="text")
    shipper.start()
    try:
        first = [decision_record(n) for n in range(20)]
        journal.append([encode(r) for r in first])
        wait_for(lambda: shipper.status().shipped_records == 20, 20)
        killed = shipper.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: "exited with code -9" in shipper.status().last_error, 10)

        later = [decision_record(n) for n in range(20, 50)]
        journal.append([encode(r) for r in later])
        # 50: the earlier child's count is kept.
        wait_for(lambda: shipper.status().shipped_records == 50, 20)
        assert shipper.pid not in (None, killed)
        assert stored_ids(url) == {r.decision_id for r in first + later}
    finally:
        journal.close()
        assert shipper.stop(drain_timeout_s=5.0)
    assert shipper.pid is not None and not alive(shipper.pid)


def test_the_shipper_process_drains_and_exits_when_its_server_is_killed(tmp_path):
    """The server dies by SIGKILL, as an OOM kill does: its child sees its stdin end,
    ships what the journal holds and exits within the drain."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    script = f"""
import os, signal, time
from pathlib import Path
from server.audit.journal import Journal
from server.audit.record import encode
from server.audit.ship_process import ShipperProcess
from server.audit.settings import AuditSettings
from tests.server.audit.conftest import decision_record
journal = Journal(Path({str(tmp_path / "journal")!r}), segment_max_bytes=1 << 20,
                  fsync_interval_ms=0)
journal.open()
settings = AuditSettings(database_url={url!r}, shutdown_drain_s=10.0)
# Idle for a minute: nothing ships before the kill, so the drain ships all of it.
shipper = ShipperProcess(journal, settings, migrate=True, log_level="INFO",
                         log_format="text", idle_interval_ms=60_000.0)
shipper.start()
while not shipper.store_ok:
    time.sleep(0.01)
for n in range(40):
    record = decision_record(n)
    journal.append([encode(record)])
    print(record.decision_id, flush=True)
print("child", shipper.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    # The server's stderr to a file: a pipe would be held open by the child (it logs
    # there), and the run would end only when the child does.
    with (tmp_path / "server.log").open("w") as log:
        server = subprocess.run(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=REPO,
            timeout=60,
        )
    assert server.returncode == -signal.SIGKILL, (tmp_path / "server.log").read_text()
    *ids, child_line = server.stdout.split("\n")[:-1]
    child_pid = int(child_line.removeprefix("child "))
    wait_for(lambda: not alive(child_pid), 15)
    assert stored_ids(url) == set(ids)


def test_the_backlog_cap_holds_while_no_shipper_process_reports(tmp_path):
    """A child waiting for the folder's lock (a child of the last server still draining)
    says nothing: the server measures the backlog itself and refuses at the cap."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    journal = Journal(tmp_path / "journal", segment_max_bytes=1 << 20, fsync_interval_ms=0)
    journal.open()
    held = os.open(tmp_path / "journal" / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(held, fcntl.LOCK_EX)  # the draining child of an earlier server
    settings = AuditSettings(database_url=url, max_backlog_bytes=10_000)
    shipper = ShipperProcess(journal, settings, migrate=True, log_level="INFO", log_format="text")
    shipper.start()
    try:
        assert not shipper.full
        journal.append([encode(decision_record(n)) for n in range(20)])  # ~23 KB
        wait_for(lambda: shipper.full, 5)
        assert not shipper.store_ok  # nothing reported yet
        os.close(held)
        wait_for(lambda: shipper.store_ok and not shipper.full, 20)
        assert len(stored_ids(url)) == 20
    finally:
        journal.close()
        shipper.stop(drain_timeout_s=5.0)
