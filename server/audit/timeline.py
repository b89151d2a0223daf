"""What the recorded decisions looked like over time: per step, how many were made, which
source answered them, how long they took, and why the ones the model did not make went
to the ladder. On-call reads it after an incident ("the model's share fell at 14:02:
why?"); a benchmark kept with ``--keep`` reads its servers' audit stores the same way.

A reason is grouped by its text with every number in it masked (``primary skipped: #
ms of budget left (needs #)``), so that one cause is one line whatever the figures.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.audit.archive import Archive
from server.audit.reader import DecisionReader
from server.audit.replay import MODEL_SOURCES
from server.audit.store import decisions

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def reason_kind(reason: str) -> str:
    """``reason`` with every number masked: one line per cause."""
    return _NUMBER.sub("#", reason)


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the timeline reads of one decision."""

    decided_at: dt.datetime
    source: str
    reason: str
    total_us: int


@dataclass(frozen=True, slots=True)
class Step:
    start: dt.datetime
    decisions: int
    by_source: dict[str, int]
    # Reasons (numbers masked) of the decisions no model made, most frequent first.
    fallbacks: list[tuple[str, int]]
    total_p50_ms: float
    total_p99_ms: float

    @property
    def model_share(self) -> float:
        return sum(self.by_source.get(s, 0) for s in MODEL_SOURCES) / self.decisions

    def as_dict(self) -> dict[str, object]:
        return {
            "start": self.start.isoformat(),
            "decisions": self.decisions,
            "model_share": round(self.model_share, 4),
            "by_source": self.by_source,
            "fallbacks": dict(self.fallbacks),
            "total_p50_ms": round(self.total_p50_ms, 3),
            "total_p99_ms": round(self.total_p99_ms, 3),
        }


_RECORDED_COLUMNS = ("decided_at", "source", "reason", "total_us")


@dataclass(frozen=True, slots=True)
class Loaded:
    """The decisions read, oldest first; ``cut``: more were made in the time asked for
    than the limit allowed, and the oldest of them were left out."""

    recorded: list[Recorded]
    cut: bool


def load_recorded(
    engine: Engine,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 200_000,
    archive: Archive | None = None,
) -> Loaded:
    """The newest ``limit`` decisions made in ``[since, until)`` (the time is
    ``decided_at``'s: indexed, as replay selects), from the database and from ``archive``
    for the days that left it: an incident is usually at the end of the time asked for."""
    c = decisions.c
    query = (
        sa.select(c.decided_at, c.source, c.reason, c.total_us)
        .order_by(c.decided_at.desc())
        .limit(limit + 1)
    )
    if since is not None:
        query = query.where(c.decided_at >= since)
    if until is not None:
        query = query.where(c.decided_at < until)
    with engine.connect() as conn:
        newest_first = [Recorded(*row) for row in conn.execute(query)]
    archived = DecisionReader(engine, archive).archived_between(
        since, until, columns=_RECORDED_COLUMNS
    )
    if archived:
        newest_first += [Recorded(**row) for row in archived]
        newest_first.sort(key=lambda r: _utc(r.decided_at), reverse=True)
    return Loaded(newest_first[:limit][::-1], cut=len(newest_first) > limit)


def _percentile_ms(sorted_us: Sequence[int], share: float) -> float:
    return sorted_us[min(len(sorted_us) - 1, int(share * len(sorted_us)))] / 1000.0


def timeline(recorded: Iterable[Recorded], step_s: float) -> list[Step]:
    """``recorded`` in steps of ``step_s``, each starting at a multiple of ``step_s``
    since the epoch (10 s steps at :00, :10, …); steps with no decision are left out."""
    by_step: dict[int, list[Recorded]] = {}
    for record in recorded:
        index = math.floor(_utc(record.decided_at).timestamp() / step_s)
        by_step.setdefault(index, []).append(record)
    steps = []
    for index, in_step in sorted(by_step.items()):
        total_us = sorted(r.total_us for r in in_step)
        fallbacks = Counter(reason_kind(r.reason) for r in in_step if r.source not in MODEL_SOURCES)
        steps.append(
            Step(
                start=dt.datetime.fromtimestamp(index * step_s, dt.UTC),
                decisions=len(in_step),
                by_source=dict(Counter(r.source for r in in_step).most_common()),
                fallbacks=fallbacks.most_common(),
                total_p50_ms=_percentile_ms(total_us, 0.5),
                total_p99_ms=_percentile_ms(total_us, 0.99),
            )
        )
    return steps


def _utc(at: dt.datetime) -> dt.datetime:
    # SQLite gives back the stored UTC time without its zone.
    return at.astimezone(dt.UTC) if at.tzinfo else at.replace(tzinfo=dt.UTC)


def format_timeline(steps: Sequence[Step], *, reasons: int = 2) -> str:
    """A heading, then one line per step: its start (UTC), decisions, the model's share,
    the total time's p50 / p99, each source, and the ``reasons`` most frequent fallback
    reasons; a line with the date before the first step of each day."""
    if not steps:
        return "no recorded decision in that time"
    lines = [
        "step start (UTC), decisions, model share, total time p50 / p99, by source"
        " | the most frequent fallback reasons"
    ]
    day = None
    for step in steps:
        if step.start.date() != day:
            day = step.start.date()
            lines.append(f"{day:%Y-%m-%d}")
        sources = " ".join(f"{name} {n}" for name, n in step.by_source.items())
        why = "; ".join(f"{n} x {kind}" for kind, n in step.fallbacks[:reasons])
        more = len(step.fallbacks) - reasons
        if more > 0:
            why += f"{'; ' if why else ''}{more} more reason{'s' if more > 1 else ''}"
        lines.append(
            f"{step.start:%H:%M:%S.%f}"[:-3]
            + f"  {step.decisions:6,d}  model {100 * step.model_share:5.1f} %"
            + f"  {step.total_p50_ms:6.1f} / {step.total_p99_ms:6.1f} ms  {sources}"
            + (f"  | {why}" if why else "")
        )
    return "\n".join(lines)
