"""The raw websocket recording format the exchange readers share, and its value checks.

One line a frame, as cryptofeed's raw-data recorder writes it: ``RECEIVE_TIME: JSON``, or
``URL -> RECEIVE_TIME: JSON`` for a REST response; its connection records and blank lines
are skipped. :func:`merged_lines` reads a recording split over several files as one
stream in receive-time order, each file's own order kept.
Format: docs/market-data.md#websocket-recordings-coinbase-binance-kraken
"""

from __future__ import annotations

import csv
import gzip
import heapq
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path


class MalformedLine(ValueError):
    """A line or value that does not follow the format; the message says what was wrong."""


class UnreadableFile(Exception):
    """A recording file that cannot be read on: cut short, not text, not gzip, not there.
    Unlike a malformed line, nothing after it can be read, so it ends the replay."""

    def __init__(self, path: Path, lines_read: int, cause: BaseException) -> None:
        super().__init__(f"{path}: {_read_failure(cause, lines_read)}")


# What reading a file of a recording can raise (gzip's BadGzipFile is an OSError).
READ_ERRORS = (OSError, EOFError, UnicodeDecodeError, zlib.error, csv.Error)


def _read_failure(cause: BaseException, lines_read: int) -> str:
    """``cause`` in on-call's words, on one line."""
    where = f" after line {lines_read:,}" if lines_read else ""
    detail = (str(cause).splitlines() or [type(cause).__name__])[0]
    if isinstance(cause, EOFError):
        return f"cut short{where} ({detail})"
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 text{where}, a binary file? ({cause.reason})"
    if isinstance(cause, gzip.BadGzipFile | zlib.error):
        return f"not gzip, or its data is corrupt{where} ({detail})"
    if isinstance(cause, csv.Error):
        return f"not CSV text{where} ({detail})"
    return f"{detail}{where}"


@dataclass(frozen=True, slots=True)
class RecordedLine:
    receive_time_us: int
    body: str  # the JSON text
    url: str | None = None  # the request, for a REST response


@dataclass(frozen=True, slots=True)
class Skipped:
    kind: str  # "blank" or "connection"


def classify(text: str) -> RecordedLine | Skipped:
    """One line of a recording; raises :class:`MalformedLine`."""
    text = text.rstrip("\r\n")
    if not text.strip():
        return Skipped("blank")
    head, sep, body = text.partition(": ")
    first = head.split(" ", 1)[0]
    if "://" in first:
        url, arrow, when = head.partition(" -> ")
        if arrow and sep:
            return RecordedLine(seconds_to_us(when), body, url)
        return Skipped("connection")  # `URL <-> TIME`, `URL <- TIME: JSON`
    if not sep:
        raise MalformedLine("expected 'RECEIVE_TIME: JSON'")
    return RecordedLine(seconds_to_us(head), body)


def merged_lines(paths: Iterable[Path]) -> Iterator[tuple[str, str]]:
    """``(file:line, text)`` of every line of ``paths``, as one stream ordered by receive
    time; a line without a readable time keeps its place after the line before it."""
    return ((where, text) for _, _, where, text in heapq.merge(*map(_timed_lines, paths)))


def _timed_lines(path: Path) -> Iterator[tuple[int, int, str, str]]:
    last_us = 0
    number = 0
    try:
        # newline="": a "\r" inside a line is not a line end, so line numbers match `wc -l`.
        with path.open(encoding="utf-8", errors="replace", newline="") as lines:
            for number, text in enumerate(lines, start=1):
                try:
                    found = classify(text)
                except MalformedLine:
                    found = Skipped("unreadable")
                if isinstance(found, RecordedLine):
                    last_us = found.receive_time_us
                yield last_us, number, f"{path.name}:{number}", text
    except READ_ERRORS as exc:
        raise UnreadableFile(path, number, exc) from exc


def seconds_to_us(text: str) -> int:
    """Decimal Unix seconds to integer microseconds, exactly (a float holds ~0.2 us at
    today's epoch seconds)."""
    try:
        seconds = Decimal(text.strip())
    except InvalidOperation:
        raise MalformedLine(f"time {text[:40]!r} is not a number") from None
    if not seconds.is_finite():
        raise MalformedLine(f"time {text!r} is not finite")
    return int(seconds.scaleb(6).to_integral_value())


def number(value: object, what: str) -> float:
    """A decimal string (venues send prices and sizes as strings to keep their digits)."""
    if not isinstance(value, str):
        raise MalformedLine(f"{what} {value!r} is not a decimal string")
    try:
        result = float(value)
    except ValueError:
        raise MalformedLine(f"{what} {value!r} is not a number") from None
    if not math.isfinite(result):
        raise MalformedLine(f"{what} {value!r} is not finite")
    return result


def price(value: object) -> float:
    result = number(value, "price")
    if result <= 0:
        raise MalformedLine(f"price {value!r} is not positive")
    return result


def size(value: object) -> float:
    result = number(value, "size")
    if result < 0:
        raise MalformedLine(f"size {value!r} is negative")
    return result


def text_field(message: dict[str, object], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise MalformedLine(f"field {key!r} is missing or not a string")
    return value


def int_field(message: dict[str, object], key: str) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedLine(f"field {key!r} is missing or not an integer")
    return value
