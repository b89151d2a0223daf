"""One reader of recorded decisions, from the database and from the archive for the days
that left it: replay (``python -m server.audit replay``, ``decisionctl replay``) and the
labeler read through it.

By id: the database first; an id it lacks is looked for in the archive's day its UUIDv7
names (and the next day, for a decision made just before midnight and decided after it),
where only the row groups whose id range holds it are read. An id of version 4 (recorded
before ids were UUIDv7) says no day: every archived day is looked in.
By time: the database's rows in ``[since, until)`` and the archived rows of the days in
it that were removed from the database.
Rows are dicts of the ``decisions`` columns, times in UTC, JSON decoded.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from core.ids import id_time_ms
from server.audit.archive import Archive, day_of, utc_times
from server.audit.store import ID_CHUNK, decisions

# The longest a decision takes from its id to its decided_at, with room: an id made this
# close to midnight is looked for in the next day too.
DECIDED_WITHIN = dt.timedelta(minutes=1)


def _ordered(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Oldest first, each id once (a row both restored and archived is the same row)."""
    unique = {row["decision_id"]: row for row in rows}
    return sorted(unique.values(), key=lambda r: (r["decided_at"], r["decision_id"]))


class DecisionReader:
    def __init__(self, engine: Engine, archive: Archive | None = None) -> None:
        self.engine = engine
        self.archive = archive

    def by_ids(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The decisions of ``ids`` that were recorded, oldest first."""
        column = decisions.c.decision_id
        rows: list[dict[str, Any]] = []
        with self.engine.connect() as conn:
            for start in range(0, len(ids), ID_CHUNK):
                query = sa.select(decisions).where(column.in_(ids[start : start + ID_CHUNK]))
                rows += [utc_times(dict(row)) for row in conn.execute(query).mappings()]
        found = {row["decision_id"] for row in rows}
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        if missing and self.archive is not None:
            rows += self._archived_ids(self.archive, missing)
        return _ordered(rows)

    def _archived_ids(self, archive: Archive, ids: list[str]) -> list[dict[str, Any]]:
        by_day: dict[dt.date, list[str]] = {}
        timeless = []
        for decision_id in ids:
            made_ms = id_time_ms(decision_id)
            if made_ms is None:
                timeless.append(decision_id)
                continue
            made = dt.datetime.fromtimestamp(made_ms / 1000, dt.UTC)
            for day in {day_of(made), day_of(made + DECIDED_WITHIN)}:
                by_day.setdefault(day, []).append(decision_id)
        if timeless:
            for day in archive.days():
                by_day.setdefault(day, []).extend(timeless)
        rows = []
        for day, day_ids in sorted(by_day.items()):
            rows += archive.read(day, ids=day_ids)
        return rows

    def between(
        self, since: dt.datetime | None, until: dt.datetime | None, limit: int
    ) -> list[dict[str, Any]]:
        """The decisions made in ``[since, until)``, oldest first, at most ``limit``."""
        query = sa.select(decisions).order_by(decisions.c.decided_at).limit(limit)
        if since is not None:
            query = query.where(decisions.c.decided_at >= since)
        if until is not None:
            query = query.where(decisions.c.decided_at < until)
        with self.engine.connect() as conn:
            rows = [utc_times(dict(row)) for row in conn.execute(query).mappings()]
        return _ordered([*rows, *self.archived_between(since, until)])[:limit]

    def archived_between(
        self,
        since: dt.datetime | None,
        until: dt.datetime | None,
        columns: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """The archived decisions made in ``[since, until)`` on days that left the
        database (the others are read from it); only ``columns`` if given."""
        if self.archive is None:
            return []
        if since is None:  # from the first archived day: the archive is listed
            days = self.archive.days()
        else:  # one manifest looked at a day: the labeler asks every few seconds
            last = max(day_of(until or dt.datetime.now(dt.UTC)), day_of(since))
            days = [
                day_of(since) + dt.timedelta(days=n) for n in range((last - day_of(since)).days + 1)
            ]
        rows = []
        for day in days:
            if until is not None and day > day_of(until):
                break
            manifest = self.archive.manifest(day)
            if manifest is None or manifest.removed is None:
                continue
            rows += self.archive.read(day, since=since, until=until, columns=columns)
        return rows
