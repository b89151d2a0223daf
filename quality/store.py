"""The labeler's side of the audit store: decisions without an outcome, outcomes written.

Decisions are read by ``decided_at`` from a watermark (indexed), those with an outcome
left out by an anti-join on its primary key (the decision's id and ``decided_at``: the
same day's partition on PostgreSQL). Outcome inserts skip ids already labelled, so two
labelers, or one restarted, never write a decision's outcome twice. Decisions and
outcomes of days that left the database are read from the archive.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from server.audit.archive import Archive, day_of
from server.audit.reader import DecisionReader
from server.audit.store import decision_outcomes, decisions, from_us, held

_PENDING_COLUMNS = (
    "decision_id", "decided_at", "feature_time", "symbol", "side", "features", "source",
    "model_name", "model_version", "score", "threshold", "shadow_model_name",
    "shadow_model_version", "shadow_score",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PendingDecision:
    """What labelling a decision needs, from its audit row."""

    decision_id: str
    decided_at_us: int
    feature_time_us: int
    symbol: str
    side_sign: float  # +1 buy, -1 sell
    spread_bps: float | None  # from the recorded features; None if not recorded
    source: str
    model_name: str
    model_version: str
    score: float | None
    threshold: float
    shadow_model_name: str | None
    shadow_model_version: str | None
    shadow_score: float | None


@dataclass(frozen=True, slots=True)
class Outcome:
    decision_id: str
    decided_at_us: int  # the decision's
    label: int | None  # None: no label, ``reason`` says why
    mid_at_features: float | None = None
    mid_after_horizon: float | None = None
    reason: str = ""


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


def epoch_us(value: dt.datetime) -> int:
    """µs since the epoch, exactly (a float timestamp can be a microsecond off)."""
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=dt.UTC)
    return (value - _EPOCH) // _MICROSECOND


class OutcomeStore:
    def __init__(self, engine: Engine, *, horizon_ms: int, archive: Archive | None = None) -> None:
        """``archive``: where the decisions that left the database are read from (a
        labeler catching up on days past the retention)."""
        self.engine = engine
        self._horizon_ms = horizon_ms
        self._reader = DecisionReader(engine, archive)
        self._archived_outcomes = None if archive is None else archive.of(decision_outcomes)
        insert: Any = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self._insert = insert(decision_outcomes).on_conflict_do_nothing(
            index_elements=["decision_id", "decided_at"]
        )

    def has_tables(self) -> bool:
        """Whether the tables the labeler reads and writes exist: the decision server
        creates them as it starts, which may be after the labeler."""
        inspector = sa.inspect(self.engine)
        return all(inspector.has_table(t.name) for t in (decisions, decision_outcomes))

    def pending(self, since_us: int, limit: int) -> list[PendingDecision]:
        """Decisions from ``since_us`` on (by ``decided_at``) that used features and have
        no outcome yet, oldest first, at most ``limit``: the database's, then the
        archive's of days that left it."""
        d, o = decisions, decision_outcomes
        query = (
            sa.select(*(d.c[name] for name in _PENDING_COLUMNS))
            .select_from(
                d.outerjoin(
                    o, sa.and_(o.c.decision_id == d.c.decision_id, o.c.decided_at == d.c.decided_at)
                )
            )
            .where(
                d.c.decided_at >= from_us(since_us),
                d.c.feature_time.is_not(None),
                o.c.decision_id.is_(None),
            )
            .order_by(d.c.decided_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            rows = [row._asdict() for row in conn.execute(query)]
        if len(rows) < limit:
            archived = self._archived_pending(since_us)
            rows = sorted([*rows, *archived], key=lambda r: epoch_us(r["decided_at"]))[:limit]
        return [_pending(row) for row in rows]

    def _archived_pending(self, since_us: int) -> list[dict[str, Any]]:
        """The archive's decisions from ``since_us`` on, of days that left the database,
        that used features and have no outcome, in the database or the archive."""
        archived = [
            row
            for row in self._reader.archived_between(
                from_us(since_us), None, columns=_PENDING_COLUMNS
            )
            if row["feature_time"] is not None
        ]
        with self.engine.connect() as conn:
            ids = [row["decision_id"] for row in archived]
            labelled = held(conn, decision_outcomes.c.decision_id, ids)
        if self._archived_outcomes is not None:
            by_day: dict[dt.date, list[str]] = {}
            for row in archived:
                by_day.setdefault(day_of(row["decided_at"]), []).append(row["decision_id"])
            for day, day_ids in by_day.items():
                found = self._archived_outcomes.read(day, ids=day_ids, columns=["decision_id"])
                labelled.update(row["decision_id"] for row in found)
        return [row for row in archived if row["decision_id"] not in labelled]

    def record(self, outcomes: Sequence[Outcome], labeled_at_us: int) -> None:
        if not outcomes:
            return
        labeled_at = from_us(labeled_at_us)
        rows = [
            {
                "decision_id": outcome.decision_id,
                "decided_at": from_us(outcome.decided_at_us),
                "labeled_at": labeled_at,
                "horizon_ms": self._horizon_ms,
                "label": outcome.label,
                "mid_at_features": outcome.mid_at_features,
                "mid_after_horizon": outcome.mid_after_horizon,
                "reason": outcome.reason,
            }
            for outcome in outcomes
        ]
        with self.engine.begin() as conn:
            conn.execute(self._insert, rows)


def _pending(row: dict[str, Any]) -> PendingDecision:
    return PendingDecision(
        decision_id=row["decision_id"],
        decided_at_us=epoch_us(row["decided_at"]),
        feature_time_us=epoch_us(row["feature_time"]),
        symbol=row["symbol"],
        side_sign=1.0 if row["side"] == "BUY" else -1.0,
        spread_bps=(row["features"] or {}).get("spread_bps"),
        source=row["source"],
        model_name=row["model_name"],
        model_version=row["model_version"],
        score=row["score"],
        threshold=row["threshold"],
        shadow_model_name=row["shadow_model_name"],
        shadow_model_version=row["shadow_model_version"],
        shadow_score=row["shadow_score"],
    )
