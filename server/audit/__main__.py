"""``python -m server.audit``: the audit store's schema, replay of recorded decisions, and
their timeline.

    python -m server.audit migrate
    python -m server.audit replay --since 2026-11-21T09:00 --until 2026-11-21T10:00
    python -m server.audit timeline --since 15m --step 10s
    python -m server.audit archive
    python -m server.audit restore 2026-11-21

The database URL comes from ``--database-url`` or ``DECISION_AUDIT__DATABASE_URL``. Each
command's --help gives its exit codes; more forms and examples: docs/audit.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import sys
from pathlib import Path

import sqlalchemy as sa

from core.cli_args import parse_duration, parse_time, positive_int
from core.settings import settings_from_environment
from server.audit.archive import Archive, archive, restore
from server.audit.migrate import upgrade
from server.audit.reader import DecisionReader
from server.audit.replay import ReplayError, ReplayReport, replay, select_decisions
from server.audit.settings import AuditSettings
from server.audit.store import create_store_engine
from server.audit.timeline import format_timeline, load_recorded, timeline
from server.settings import Settings

DIFFERENCES_SHOWN = 20
TIMELINE_DEFAULT_SPAN = dt.timedelta(minutes=15)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL of the audit store")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="bring the audit store's schema to the latest version")
    rp = commands.add_parser(
        "replay",
        help="score recorded decisions again and compare",
        description="Scores recorded decisions again with the model version that made each "
        "(or --against another archive) and compares the scores and decisions. Exits 0 when "
        "all match, 1 when some differ, 2 when it could not run.",
    )
    # Here too, so that replay's own help lists it; SUPPRESS: not given here, the main
    # parser's value stands.
    rp.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        help="SQLAlchemy URL of the audit store (default: DECISION_AUDIT__DATABASE_URL, or "
        ".run/audit/audit.db in the current folder)",
    )
    rp.add_argument("--decision-id", action="append", default=[], help="repeatable")
    rp.add_argument(
        "--since",
        type=parse_time,
        help="from, inclusive: 2026-11-21T09:00 (UTC if no zone) or 2h (ago)",
    )
    rp.add_argument("--until", type=parse_time, help="to, exclusive: as --since")
    rp.add_argument("--limit", type=int, default=10_000, help="most decisions (default 10000)")
    rp.add_argument(
        "--archive-url",
        help="the archive, for decisions that left the database "
        "(default DECISION_AUDIT__ARCHIVE_URL)",
    )
    model = rp.add_mutually_exclusive_group()
    model.add_argument(
        "--model-store",
        type=Path,
        default=Path(".run/models"),
        help="folder of .mar archives, looked up by version hash (default .run/models)",
    )
    model.add_argument("--replica", help="host:port of a running replica serving the version")
    model.add_argument("--against", type=Path, help="score with this archive instead")
    rp.add_argument("--tolerance", type=float, default=1e-6, help="largest score difference")
    rp.add_argument("--json", action="store_true", help="print the report as JSON")
    tl = commands.add_parser(
        "timeline",
        help="recorded decisions over time: sources, time taken, fallback reasons",
        description="Per step of --step: how many decisions were made, the model's share, "
        "each source, the total time's p50 / p99, and why the ones no model made went to the "
        "ladder (reasons with their numbers masked). Exits 0, or 2 when it could not run or "
        "no decision was recorded in that time.",
    )
    tl.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        help="SQLAlchemy URL of the audit store (default: DECISION_AUDIT__DATABASE_URL, or "
        ".run/audit/audit.db in the current folder)",
    )
    tl.add_argument(
        "--since",
        type=parse_time,
        help="from, inclusive: 2026-11-21T09:00 (UTC if no zone) or 2h (ago); default 15"
        " minutes before --until",
    )
    tl.add_argument("--until", type=parse_time, help="to, exclusive: as --since (default now)")
    tl.add_argument("--step", type=parse_duration, default=1.0, help="90, 10s, 1m (default 1s)")
    tl.add_argument(
        "--limit",
        type=positive_int,
        default=200_000,
        help="most decisions, the newest (default 200000)",
    )
    tl.add_argument(
        "--reasons", type=positive_int, default=2, help="fallback reasons a step (default 2)"
    )
    tl.add_argument("--json", action="store_true", help="print the steps as JSON")
    tl.add_argument(
        "--archive-url",
        help="the archive, for days that left the database (default DECISION_AUDIT__ARCHIVE_URL)",
    )
    ar = commands.add_parser(
        "archive",
        help="write each closed day to the archive, verify it, remove the days past the retention",
        description="Writes each closed day of decisions and of their outcomes to the archive "
        "as Parquet, verifies its row count and id checksum against the database, and removes "
        "from the database the verified days older than the retention. Exits 0, 1 when a day "
        "could not be verified (it is tried again next run), 2 when it could not run.",
    )
    ar.add_argument("--archive-url", help="default DECISION_AUDIT__ARCHIVE_URL")
    ar.add_argument("--retention-days", type=int, help="default DECISION_AUDIT__RETENTION_DAYS")
    rs = commands.add_parser(
        "restore",
        help="put an archived day back into the database",
        description="Inserts an archived day's decisions and outcomes into the database again "
        "(those there already are left as they are); the next archive run removes the day again "
        "once it is past the retention. Exits 0, 2 when the day is not in the archive.",
    )
    rs.add_argument("day", type=dt.date.fromisoformat, help="2026-11-21 (UTC)")
    rs.add_argument("--archive-url", help="default DECISION_AUDIT__ARCHIVE_URL")
    for sub in (ar, rs):
        sub.add_argument(
            "--database-url", default=argparse.SUPPRESS, help="SQLAlchemy URL of the audit store"
        )
    return parser  # fmt: skip


def _archive(engine: sa.Engine, args: argparse.Namespace, settings: AuditSettings) -> int:
    url = args.archive_url or settings.archive_url
    store = Archive(url)
    if args.command == "restore":
        if store.manifest(args.day) is None:
            print(f"restore: {args.day} is not in the archive at {url}", file=sys.stderr)
            return 2
        restored = restore(engine, store, args.day)
        print(f"restored {args.day}: " + ", ".join(f"{n:,} {t}" for t, n in restored.items()))
        return 0
    retention = settings.retention_days if args.retention_days is None else args.retention_days
    upgrade(engine)
    report = archive(
        engine, store, archive_after_s=settings.archive_after_s, retention_days=retention
    )
    for line in report.archived:
        print(f"archived {line}")
    for line in report.removed:
        print(f"removed  {line}")
    for line in report.problems:
        print(f"archive: {line}", file=sys.stderr)
    if not (report.archived or report.removed or report.problems):
        print("archive: nothing to do")
    return 1 if report.problems else 0


def _missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite ``url`` when it does not exist (a relative path is read from
    the current folder), else None."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.query.get("uri") == "true":  # a file: URI: sqlite3 reads it itself
        return None
    path = Path(parsed.database).resolve()
    return None if path.exists() else path


def _print_report(report: ReplayReport) -> None:
    print(f"selected {report.selected}, replayed {report.replayed}, "
          f"differences {len(report.differences)}")  # fmt: skip
    for reason, count in sorted(report.skipped.items()):
        print(f"  skipped {count}: {reason}")
    for reason, count in sorted(report.unreplayable.items()):
        print(f"  NOT REPLAYED {count}: {reason}")
    for diff in report.differences[:DIFFERENCES_SHOWN]:
        print(
            f"  DIFFERS {diff.decision_id}: score {diff.recorded_score:.6f} -> "
            f"{diff.replayed_score:.6f}, {diff.recorded_decision} -> {diff.replayed_decision}"
        )
    if len(report.differences) > DIFFERENCES_SHOWN:
        print(f"  ... and {len(report.differences) - DIFFERENCES_SHOWN} more (--json for all)")


def _timeline(engine: sa.Engine, args: argparse.Namespace, settings: AuditSettings) -> int:
    until = args.until or dt.datetime.now(dt.UTC)
    since = args.since or until - TIMELINE_DEFAULT_SPAN
    if since >= until:
        print(f"timeline: --since {since:%Y-%m-%dT%H:%M:%S} is not before --until "
              f"{until:%Y-%m-%dT%H:%M:%S}", file=sys.stderr)  # fmt: skip
        return 2
    archive = Archive(args.archive_url or settings.archive_url)
    loaded = load_recorded(engine, since=since, until=until, limit=args.limit, archive=archive)
    if not loaded.recorded:
        print("timeline: no recorded decision in that time", file=sys.stderr)
        return 2
    if loaded.cut:  # said first: the steps start later than asked
        print(
            f"timeline: more than --limit {args.limit:,} decisions in that time; these are "
            f"the newest, from {loaded.recorded[0].decided_at} (raise --limit, or narrow "
            "--since/--until)",
            file=sys.stderr,
            flush=True,
        )
    steps = timeline(loaded.recorded, args.step)
    if args.json:
        print(json.dumps([step.as_dict() for step in steps], indent=1))
    else:
        print(format_timeline(steps, reasons=args.reasons))
    return 0


def main(argv: list[str] | None = None, *, prog: str = "python -m server.audit") -> int:
    """``prog``: the command's name in usage lines (``decisionctl`` runs replay and
    timeline too)."""
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from_environment(Settings, prog).audit
    url = args.database_url or settings.database_url
    if args.command in ("replay", "timeline", "restore"):
        missing = _missing_sqlite_file(url)
        if missing is not None:  # reading must not create an empty store
            print(
                f"{args.command}: no audit store at {missing} (give --database-url, or run "
                "from the checkout whose stack recorded the decisions)",
                file=sys.stderr,
            )
            return 2
    engine = create_store_engine(url)
    try:
        if args.command == "migrate":
            upgrade(engine)
            print("audit store at the latest schema")
            return 0
        if args.command == "timeline":
            return _timeline(engine, args, settings)
        if args.command in ("archive", "restore"):
            return _archive(engine, args, settings)
        if not (args.decision_id or args.since or args.until):
            print("replay: give --decision-id, or --since/--until", file=sys.stderr)
            return 2
        reader = DecisionReader(engine, Archive(args.archive_url or settings.archive_url))
        records = select_decisions(
            reader, args.decision_id, since=args.since, until=args.until, limit=args.limit
        )
        if not records:
            print("replay: no recorded decision matches", file=sys.stderr)
            return 2
        print(f"replaying {len(records):,} recorded decisions ...", file=sys.stderr, flush=True)
        report = asyncio.run(
            replay(
                records,
                model_store=None if (args.replica or args.against) else args.model_store,
                replica=args.replica,
                against=args.against.resolve() if args.against else None,
                tolerance=args.tolerance,
            )
        )
    except ReplayError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    except sa.exc.DBAPIError as exc:  # unreachable, or not an audit store (no tables)
        print(f"{args.command}: audit store {engine.url!r}: {exc.orig}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(report)
    if report.unreplayable:
        return 2
    return 1 if report.differences else 0


if __name__ == "__main__":
    sys.exit(main())
