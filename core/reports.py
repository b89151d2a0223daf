"""What the processes off the Decide path report for ``decisionctl status``, in Redis.

- The feature cache: the symbols whose market events it has ignored for a while (a
  hash ``{prefix}feed:ignored``, a field per symbol), written by the consumer that owns
  the symbol's partition, the field removed when the symbol's events apply again.
- The labeler: how far its labels trail the decisions (``{prefix}quality:labels``).

Each entry carries the time it was written; one older than ``REPORT_TTL_S`` is from a
process that stopped, and readers leave it out. Prometheus has the same figures as
metrics, for alerts; these copies are what a decision server can show on-call without
knowing where those processes run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

# A report refreshed less often than this is from a process that stopped. Writers report
# every few seconds at most (the labeler: once a pass).
REPORT_TTL_S = 60.0


@dataclass(frozen=True, slots=True)
class IgnoredFeed:
    """A symbol whose every event has been ignored since ``since_us``."""

    symbol: str
    since_us: int  # wall clock of the first ignored event since the last applied one
    events: int  # events ignored since then
    reason: str  # why the last one was: "duplicate" or "old_session"
    at_us: int  # when this was reported


@dataclass(frozen=True, slots=True)
class LabelProgress:
    """How far the labeler's labels trail the decisions it reads."""

    newest_decision_us: int  # decision time of the newest decision read (0: none yet)
    newest_labelled_us: int  # decision time of the newest labelled one (0: none yet)
    behind_s: float  # the gap between the two while decisions come; see quality.labeler
    stopped: bool  # behind by more than the labeler's limit: labels stopped
    at_us: int  # when this was reported


def ignored_key(prefix: str) -> str:
    return f"{prefix}feed:ignored"


def labels_key(prefix: str) -> str:
    return f"{prefix}quality:labels"


def queue_ignored(
    pipe: Pipeline, prefix: str, ignored: Iterable[IgnoredFeed], resumed: Iterable[str]
) -> None:
    """Adds to ``pipe`` the symbols ignored now and the removal of those that resumed."""
    key = ignored_key(prefix)
    fields = {feed.symbol: json.dumps(asdict(feed)) for feed in ignored}
    if fields:
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # Mapping is invariant
        pipe.pexpire(key, int(REPORT_TTL_S * 1000))
    gone = list(resumed)
    if gone:
        pipe.hdel(key, *gone)


async def write_label_progress(
    client: aioredis.Redis, prefix: str, progress: LabelProgress
) -> None:
    await client.set(labels_key(prefix), json.dumps(asdict(progress)), px=int(REPORT_TTL_S * 1000))


async def read_reports(
    client: aioredis.Redis, prefix: str
) -> tuple[list[IgnoredFeed], LabelProgress | None]:
    """The symbols being ignored (by symbol) and the labels' progress (None: no labeler
    has reported lately); an unreadable entry is left out."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(ignored_key(prefix))
        pipe.get(labels_key(prefix))
        raw_ignored, raw_labels = await pipe.execute()
    oldest_us = time.time_ns() // 1000 - int(REPORT_TTL_S * 1e6)
    ignored = []
    for raw in raw_ignored.values():
        try:
            feed = IgnoredFeed(**json.loads(raw))
        except (ValueError, TypeError):
            continue
        if feed.at_us >= oldest_us:
            ignored.append(feed)
    labels = None
    if raw_labels is not None:
        try:
            labels = LabelProgress(**json.loads(raw_labels))
        except (ValueError, TypeError):
            labels = None
        if labels is not None and labels.at_us < oldest_us:
            labels = None
    return sorted(ignored, key=lambda feed: feed.symbol), labels
