"""The audit trail's costs, measured in one run on this machine.

1. Journal append: ``encode`` + ``Journal.append`` of one decision record (11 features)
   per call, each call timed, with the default segment size and fsync interval.
2. Shipping: a journal of N records shipped by ``AuditShipper`` into a fresh SQLite file
   and a fresh PostgreSQL database of this run's own (dropped at the end; on
   DECISION_BENCH_POSTGRES_URL's server, the machine's, or one it starts); rows/s from the
   shipper's start until its backlog is empty, the schema migrated before the clock.

What the audit costs a Decide: ``python -m loadtest.bench audit``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from core.domain import CallInfo, Decision, DecisionResult, OrderRequest, Side, Source
from core.stats import percentile
from feature_cache.schema import FEATURE_NAMES
from loadtest.report import markdown_table, write_block
from localstack.postgres_server import own_database, postgres_admin
from server.audit.journal import SEGMENT_MAX_BYTES, Journal
from server.audit.migrate import upgrade
from server.audit.record import DecisionRecord, encode
from server.audit.settings import AuditSettings
from server.audit.ship_child import SHIP_BATCH_RECORDS
from server.audit.ship_thread import AuditShipper
from server.audit.store import AuditStore, create_store_engine
from server.audit.trail import decision_record

say = functools.partial(print, flush=True)  # progress as it comes, piped too
DEFAULTS = AuditSettings()  # the fsync interval
SHIP_TARGET = ">= 20,000 rows/s"
Row = tuple[str, str, str, str]  # measurement, count, result, target


def make_records(count: int, seed: int = 1) -> list[DecisionRecord]:
    """Records as the server builds them (``decision_record``), with varied values."""
    rng = random.Random(seed)
    version = hashlib.sha256(b"champion").hexdigest()
    start_ns = time.time_ns()
    records = []
    for n in range(count):
        at_ns = start_ns + n * 1_000_000
        side, quantity = Side(1 + n % 2), round(rng.uniform(0.01, 5.0), 4)
        order = OrderRequest(str(uuid.uuid4()), "BTC-USD", side, quantity, client_id="bench")
        score = rng.random()
        result = DecisionResult(
            request_id=order.request_id,
            decision_id=str(uuid.uuid4()),
            decision=Decision.TRADE if score >= 0.55 else Decision.NO_TRADE,
            score=score,
            threshold=0.55,
            source=Source.PRIMARY,
            model_name="champion",
            model_version=version,
            reason=f"primary answered in {rng.uniform(0.8, 3.0):.1f} ms",
            feature_age_ms=rng.uniform(0.0, 200.0),
            features_us=rng.randint(150, 600),
            model_us=rng.randint(800, 2500),
            total_us=rng.randint(1100, 3200),
            decided_at_ns=at_ns + 1_600_000,
        )
        call = CallInfo(at_ns, uuid.uuid4().hex, "ipv4:127.0.0.1:52814")
        features = [rng.gauss(0.0, 1.0) for _ in FEATURE_NAMES]
        records.append(decision_record("bench-host:50051", call, order, features, result))
    return records


def open_journal(directory: Path) -> Journal:
    journal = Journal(directory, segment_max_bytes=SEGMENT_MAX_BYTES,
                      fsync_interval_ms=DEFAULTS.fsync_interval_ms)  # fmt: skip
    journal.open()
    return journal


def us_summary(ns: Sequence[int]) -> str:
    p50, p99, mean = percentile(ns, 0.5), percentile(ns, 0.99), statistics.fmean(ns)
    return f"median {p50 / 1000:.1f} us, p99 {p99 / 1000:.1f} us, mean {mean / 1000:.1f} us"


def bench_append(records: Sequence[DecisionRecord], directory: Path) -> list[Row]:
    say(f"[1/2] journal append: {len(records):,} records, one encode + append each")
    encode_ns, append_ns, both_ns = [], [], []
    clock = time.perf_counter_ns
    journal = open_journal(directory)
    try:
        for i, record in enumerate(records, 1):
            t0 = clock()
            payload = encode(record)
            t1 = clock()
            journal.append([payload])
            t2 = clock()
            encode_ns.append(t1 - t0)
            append_ns.append(t2 - t1)
            both_ns.append(t2 - t0)
            if i % 10_000 == 0:
                say(f"  appended {i:,}/{len(records):,}")
    finally:
        journal.close()
    n = f"{len(records):,}"
    return [
        ("journal: encode + append, per record", n, us_summary(both_ns), "<= 20 us median"),
        ("journal: encode alone", n, us_summary(encode_ns), ""),
        ("journal: append alone", n, us_summary(append_ns), ""),
    ]


def ship(
    label: str, url: str, payloads: Sequence[bytes], directory: Path, store_class: type[AuditStore]
) -> Row:
    """Ships a journal of ``payloads`` into the empty store at ``url``."""
    store = store_class(create_store_engine(url))
    upgrade(store.engine)
    journal = open_journal(directory)
    for start in range(0, len(payloads), 1000):
        journal.append(payloads[start : start + 1000])
    shipper = AuditShipper(
        journal.directory,
        store,
        written=lambda: journal.position,
        batch_records=SHIP_BATCH_RECORDS,
        migrate=False,
    )
    say(f"  shipping {len(payloads):,} records into {label} …")
    try:
        started = next_report = time.perf_counter()
        shipper.start()
        while (status := shipper.status()).backlog_bytes:
            if status.last_error:  # store_ok is False until the first insert, too
                raise RuntimeError(f"{label}: {status.last_error}")
            if time.perf_counter() >= next_report + 1.0:
                next_report += 1.0
                say(f"    {status.shipped_records:,}/{len(payloads):,} shipped")
            time.sleep(0.02)  # each look lists the journal folder, holding the GIL
        elapsed = time.perf_counter() - started
    finally:
        shipper.stop(drain_timeout_s=5.0)
        journal.close()
    stored = store.count_decisions()
    store.dispose()
    if stored != len(payloads):
        raise RuntimeError(f"{label}: {stored:,} rows stored of {len(payloads):,}")
    say(f"    {stored:,} rows in {elapsed:.2f} s: {stored / elapsed:,.0f} rows/s")
    return (f"ship into {label}", f"{stored:,}", f"{stored / elapsed:,.0f} rows/s", SHIP_TARGET)


def bench_ship(payloads: Sequence[bytes], run_dir: Path) -> list[Row]:
    say(f"[2/2] shipping: {len(payloads):,} records, batches of up to {SHIP_BATCH_RECORDS:,}")
    sqlite_url = f"sqlite:///{run_dir / 'ship.db'}"
    rows = [ship("SQLite", sqlite_url, payloads, run_dir / "sqlite", AuditStore)]
    configured = os.environ.get("DECISION_BENCH_POSTGRES_URL")
    with postgres_admin(configured) as admin, own_database(admin, "audit_bench") as url:
        rows.append(ship("PostgreSQL", url, payloads, run_dir / "postgresql", AuditStore))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--appends", type=int, default=50_000)
    parser.add_argument("--ship-records", type=int, default=100_000)
    parser.add_argument(
        "--doc", type=Path, help="put the table in this doc's bench-audit-trail block"
    )
    args = parser.parse_args()

    say(f"building {max(args.appends, args.ship_records):,} decision records …")
    records = make_records(max(args.appends, args.ship_records))
    payloads = [encode(record) for record in records[: args.ship_records]]
    say(f"  {len(payloads[0]):,} bytes a record in the journal")
    # The benchmark's own data set stays out of the collector's way: a server holds no
    # 100,000 records, and full collections walking them would slow the shipper.
    gc.freeze()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        run_dir = Path(tmp)
        rows = bench_append(records[: args.appends], run_dir / "append")
        rows += bench_ship(payloads, run_dir)
    table = markdown_table(["measurement", ">n", "result", "target"], rows)
    say(f"\n{table}")
    if args.doc:
        write_block(args.doc, "bench-audit-trail", table)


if __name__ == "__main__":
    main()
