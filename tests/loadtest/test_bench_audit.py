"""bench_audit at a tiny scale: it preloads, writes both ways, archives the table and
reports what it wrote and archived."""

from __future__ import annotations

import argparse

import pytest

from loadtest import bench_audit

pytestmark = pytest.mark.integration


def test_the_fleet_bench_preloads_writes_both_ways_and_reports_it(monkeypatch):
    monkeypatch.setattr(bench_audit, "SHIP_BATCH_RECORDS", 200)
    monkeypatch.setattr(bench_audit, "FLEET_WINDOW_S", 0.5)
    args = argparse.Namespace(preload_rows=1500, writers=2, rate=2000.0, seconds=1.0)
    inserts, copies, archived = bench_audit.bench_fleet(args, bench_audit.record())
    for row, method in ((inserts, "inserts"), (copies, "COPY")):
        assert row[0] == f"PostgreSQL holding 1,500+ rows: {method}, 2 writers at 2,000 rows/s"
        written = int(row[1].replace(",", ""))
        assert written >= 2 * 200 and written % 200 == 0, row  # whole batches, both writers
        assert " rows/s (lowest " in row[2] and "a batch of 200: p50 " in row[2], row
    stored = 1500 + sum(int(row[1].replace(",", "")) for row in (inserts, copies))
    assert archived[:2] == ("the archive job: the day's rows to Parquet, verified", f"{stored:,}")
    assert " rows/s, peak memory " in archived[2], archived
