"""Command-line argument types the operator tools share: durations (``--ttl 15m``),
points in time given either way (``--since 2h`` or ``--since 2026-11-21T09:00``), and
numbers above 0."""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re

_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)([smh]?)")
# A time ago names its unit: a bare number could be a date (20261121) or a year.
_AGO = re.compile(r"\d+(?:\.\d+)?[smh]")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h`` (decimals allowed) to seconds, positive."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use seconds (90, 90s), minutes (15m) or hours (2h)"
        )
    seconds = float(match[1]) * _UNIT_S[match[2]]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be positive")
    return seconds


def parse_time(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time, in UTC: an ISO 8601 time (UTC when it names no zone) or a
    duration back from ``now`` with its unit (``15m``: fifteen minutes ago)."""
    if _AGO.fullmatch(text.strip().lower()):
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=parse_duration(text))
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        number = text.strip()
        if _DURATION.fullmatch(number) and number[0] != "-":
            raise argparse.ArgumentTypeError(
                f"invalid time {text!r}: a time ago names its unit ({number}s, {number}m or "
                f"{number}h, as in 15m), or give an ISO time (2026-11-21T09:00)"
            ) from None
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: an ISO time (2026-11-21T09:00, UTC unless it names a "
            "zone) or a duration back from now (90s, 15m, 2h)"
        ) from None
    # In UTC: SQLite compares the stored UTC text and ignores a zone.
    return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)


def positive_number(text: str) -> float:
    """A finite number above 0 (``--timeout 2.5``)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a positive number")
    return value


def positive_int(text: str) -> int:
    """A whole number above 0 (``--limit 1000``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number above 0, not {text!r}")
    return value
