"""The audit store at the fleet's scale, measured in one run on this machine.

A PostgreSQL database of this run's own (dropped at the end; on DECISION_BENCH_POSTGRES_URL's
server, the machine's, or one it starts), migrated, then given ``--preload-rows`` rows of
today (the partition that inserts go to); then ``--writers`` threads write real 5,000-row
batches at ``--rate`` rows/s for ``--seconds`` each way, in alternating windows of 30 s:
the shippers' idempotent inserts (``AuditStore.insert``: COPY into a temporary table, then
INSERT ... ON CONFLICT DO NOTHING) and a plain COPY into the table (no check for ids
stored before). Rows/s overall and in the slowest window, and each batch's time. Then
the archive job (``server.audit.archive``, in a process of its own) writes the table's day
to Parquet and verifies it: rows/s and its peak memory.

What the audit costs a Decide: ``python -m loadtest.bench audit`` and ``make profile``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from core.domain import CallInfo, Decision, DecisionResult, OrderRequest, Side, Source
from core.ids import new_decision_id
from core.stats import percentile
from feature_cache.schema import FEATURE_NAMES
from loadtest.report import markdown_table, write_block
from localstack.postgres_server import own_database, postgres_admin
from server.audit.archive import Archive, archive
from server.audit.migrate import upgrade
from server.audit.record import decode, encode
from server.audit.ship_child import SHIP_BATCH_RECORDS
from server.audit.store import (
    DECISION_COLUMNS,
    AuditStore,
    create_store_engine,
    decision_values,
    from_us,
    json_text,
)
from server.audit.trail import decision_record

say = functools.partial(print, flush=True)  # progress as it comes, piped too
FLEET_TARGET = ">= 10,000 rows/s"  # docs/capacity.md: the fleet's audit rows
FLEET_WINDOW_S = 30.0  # inserts and COPY alternate in windows of this long
Row = tuple[str, str, str, str]  # measurement, count, result, target


def record() -> dict[str, Any]:
    """A decision record as the server journals it and a shipper reads it back."""
    at_ns = time.time_ns()
    order = OrderRequest("bench-1", "BTC-USD", Side.BUY, 0.25, client_id="bench")
    result = DecisionResult(
        request_id=order.request_id, decision_id=new_decision_id(), decision=Decision.TRADE,
        score=0.71, threshold=0.55, source=Source.PRIMARY, model_name="champion",
        model_version=hashlib.sha256(b"champion").hexdigest(),
        reason="primary answered in 1.4 ms", feature_age_ms=84.0, features_us=310,
        model_us=1480, total_us=1930, decided_at_ns=at_ns + 1_600_000,
    )  # fmt: skip
    call = CallInfo(at_ns, "4bf92f3577b34da6a3ce929d0e0e4736", "ipv4:127.0.0.1:52814")
    features = [0.5 + n / 7 for n in range(len(FEATURE_NAMES))]
    return decode(encode(decision_record("bench-host:50051", call, order, features, result)))


def preload(engine: sa.Engine, rows: int, template: dict[str, Any]) -> None:
    """``rows`` rows of ``template``'s values, new ids, 1 ms apart from today's midnight
    (today's partition, where inserts go), made by the server 1M rows a statement."""
    row = orjson.dumps({**template, "received_at": None, "decided_at": None}).decode()
    made = {"decision_id": "gen_random_uuid()::text", "received_at": "at", "decided_at": "at"}
    columns = ", ".join(made.get(c, f"t.{c}") for c in DECISION_COLUMNS)
    statement = sa.text(
        f"INSERT INTO decisions SELECT {columns}"  # noqa: S608 - the table's own columns
        " FROM jsonb_populate_record(NULL::decisions, CAST(:row AS jsonb)) AS t,"
        " generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS n,"
        " LATERAL (SELECT date_trunc('day', now()) + n * interval '1 millisecond' AS at) AS a"
    )
    for first in range(0, rows, 1_000_000):
        last = min(rows, first + 1_000_000)
        with engine.begin() as conn:
            conn.execute(statement, {"row": row, "first": first, "last": last - 1})
        say(f"    preloaded {last:,}/{rows:,} rows")


def write(url: str, template: Mapping[str, Any], method: str, per_s: float, until: float) -> Any:
    """One writer: batches of ``SHIP_BATCH_RECORDS`` new records at ``per_s`` rows a second
    until ``until``; the rows it stored and each batch's seconds."""
    store = AuditStore(create_store_engine(url))
    copy = f"COPY decisions ({', '.join(DECISION_COLUMNS)}) FROM STDIN"
    written, took, due = 0, [], time.perf_counter()
    try:
        while (started := time.perf_counter()) < until:
            now_us = time.time_ns() // 1000
            batch = [{**template, "decision_id": new_decision_id(), "decided_at_us": now_us,
                      "received_at_us": now_us} for _ in range(SHIP_BATCH_RECORDS)]  # fmt: skip
            if method == "inserts":
                store.insert(batch)
            else:
                with store.engine.begin() as conn:
                    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                    with cursor.copy(copy) as out:
                        for record in batch:
                            out.write_row(decision_values(record, from_us, json_text))
            written += len(batch)
            took.append(time.perf_counter() - started)
            due += len(batch) / per_s
            time.sleep(max(0.0, due - time.perf_counter()))
    finally:
        store.dispose()
    return written, took


def archive_job(url: str) -> tuple[float, float]:
    """The archive job over the table's rows (today's), closed as if two days later, each
    day verified whole: seconds, and the process's peak memory in MB."""
    engine = create_store_engine(url)
    now = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        report = archive(engine, Archive(folder), now=now, archive_after_s=0, retention_days=30)
        took = time.perf_counter() - started
    engine.dispose()
    if report.problems or not report.archived:
        raise RuntimeError(f"the archive job: {report.problems or 'nothing archived'}")
    return took, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_fleet(args: argparse.Namespace, template: dict[str, Any]) -> list[Row]:
    say(f"PostgreSQL at the fleet's scale: {args.preload_rows:,} rows first, then "
        f"{args.writers} writers, {args.seconds:.0f} s each way")  # fmt: skip
    configured = os.environ.get("DECISION_BENCH_POSTGRES_URL")
    windows: dict[str, list[tuple[int, float]]] = {"inserts": [], "COPY": []}  # rows, s
    batches: dict[str, list[float]] = {"inserts": [], "COPY": []}
    with postgres_admin(configured) as admin, own_database(admin, "audit_bench") as url:
        engine = create_store_engine(url)
        upgrade(engine)
        values = decision_values(template, from_us, lambda value: value)
        columns = {str(name): value for name, value in zip(DECISION_COLUMNS, values, strict=True)}
        preload(engine, args.preload_rows, columns)
        engine.dispose()
        count = max(1, round(args.seconds / FLEET_WINDOW_S))
        stored = args.preload_rows
        with ThreadPoolExecutor(args.writers) as pool:
            for n in range(2 * count):
                method = ("inserts", "COPY")[n % 2]
                start = time.perf_counter()
                writer = functools.partial(write, url, template, method, args.rate / args.writers)
                done = list(pool.map(writer, [start + args.seconds / count] * args.writers))
                took = time.perf_counter() - start
                rows = sum(r for r, _ in done)
                windows[method].append((rows, took))
                batches[method] += [t for _, times in done for t in times]
                stored += rows
                say(f"    {method}: {rows / took:,.0f} rows/s ({rows:,} in {took:.1f} s), "
                    f"{stored:,} rows in the table")  # fmt: skip
        say(f"    the archive job over the table's {stored:,} rows ...")
        spawn = multiprocessing.get_context("spawn")  # its own peak memory, not this one's
        with ProcessPoolExecutor(1, mp_context=spawn) as job:
            took, peak_mb = job.submit(archive_job, url).result()
    return [
        (f"PostgreSQL holding {args.preload_rows:,}+ rows: {method}, {args.writers} writers at "
         f"{args.rate:,.0f} rows/s", f"{sum(r for r, _ in done):,}",
         f"{sum(r for r, _ in done) / sum(t for _, t in done):,.0f} rows/s (lowest "
         f"{args.seconds / count:.0f} s: {min(r / t for r, t in done):,.0f}); a batch of"
         f" {SHIP_BATCH_RECORDS:,}: p50 {percentile(batches[method], 0.5) * 1000:.0f} ms, p99 "
         f"{percentile(batches[method], 0.99) * 1000:.0f} ms",
         FLEET_TARGET if method == "inserts" else "")
        for method, done in windows.items()
    ] + [("the archive job: the day's rows to Parquet, verified", f"{stored:,}",
          f"{stored / took:,.0f} rows/s, peak memory {peak_mb:,.0f} MB",
          f"{FLEET_TARGET} (the fleet's writes)")]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preload-rows", type=int, default=10_000_000)
    parser.add_argument("--writers", type=int, default=4, help="threads writing at once")
    parser.add_argument("--rate", type=float, default=15_000.0, help="rows/s, all writers")
    parser.add_argument("--seconds", type=float, default=300.0, help="each way")
    parser.add_argument("--doc", type=Path, help="put the table in this doc's block")
    args = parser.parse_args()
    template = record()
    say(f"  {len(orjson.dumps(template)):,} bytes a record as the shipper reads it")
    table = markdown_table(["measurement", ">n", "result", "target"], bench_fleet(args, template))
    say(f"\n{table}")
    if args.doc:
        write_block(args.doc, "bench-audit-trail", table)


if __name__ == "__main__":
    main()
