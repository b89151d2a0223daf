"""The operator tools' time arguments: a duration back from now or an ISO time, both
in UTC, and a message that shows both forms for anything else."""

from __future__ import annotations

import argparse
import datetime as dt

import pytest

from core.cli_args import parse_duration, parse_time

NOW = dt.datetime(2026, 11, 26, 6, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", dt.datetime(2026, 11, 26, 5, 45, tzinfo=dt.UTC)),
        ("2h", dt.datetime(2026, 11, 26, 4, 0, tzinfo=dt.UTC)),
        ("90s", dt.datetime(2026, 11, 26, 5, 58, 30, tzinfo=dt.UTC)),
        ("20261121", dt.datetime(2026, 11, 21, tzinfo=dt.UTC)),  # a date, not seconds ago
        ("2026-11-21T09:00", dt.datetime(2026, 11, 21, 9, 0, tzinfo=dt.UTC)),
        ("2026-11-21", dt.datetime(2026, 11, 21, tzinfo=dt.UTC)),
        ("2026-11-21T10:00+01:00", dt.datetime(2026, 11, 21, 9, 0, tzinfo=dt.UTC)),
    ],
)
def test_a_time_is_a_duration_ago_or_an_iso_time_in_utc(text, expected):
    parsed = parse_time(text, now=NOW)
    assert parsed == expected
    assert parsed.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("text", ["", "yesterday", "10xm", "-5m", "0s", "2026-13-01", "90"])
def test_anything_else_is_refused_showing_both_forms(text):
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse_time(text, now=NOW)
    message = str(refused.value)
    assert repr(text) in message
    assert ("2026-11-21T09:00" in message and "15m" in message) or "must be positive" in message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("1.5h", 5400.0), ("0.5", 0.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "15x", "-5m", "0", "0s", "1d", "m", "1h30m", "1e3"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid duration"):
        parse_duration(text)
