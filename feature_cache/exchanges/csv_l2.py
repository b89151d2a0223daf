"""The common historical L2 CSV format of market-data vendors -> events.

``incremental_book_L2`` and ``trades`` files (told apart by their header, plain or
``.gz``) are merged by ``local_timestamp``, each file's order kept; the rows of one
message become one snapshot or delta. A crossed book puts the symbol out of sync until
its next snapshot; a row that does not parse is counted and skipped; a file that cannot
be read on (cut short, binary, not gzip) raises ``UnreadableFile``.
Columns: docs/market-data.md#historical-l2-csv-files
"""

from __future__ import annotations

import csv
import gzip
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from feature_cache.events import Aggressor, BookSide, MarketEvent
from feature_cache.exchanges.feed import BookFeed, Level, ReplaySummary
from feature_cache.exchanges.recording import (
    READ_ERRORS,
    MalformedLine,
    UnreadableFile,
    price,
    size,
)

BOOK_COLUMNS = (
    "exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side", "price",
    "amount",
)  # fmt: skip
TRADE_COLUMNS = ("exchange", "symbol", "timestamp", "local_timestamp", "side", "price", "amount")
_BOOK_SIDES = {"bid": BookSide.BID, "ask": BookSide.ASK}
_TAKER_SIDES = {"buy": Aggressor.BUY, "sell": Aggressor.SELL}
_FLAGS = {"true": True, "false": False}


@dataclass(frozen=True, slots=True)
class _Row:
    local_us: int
    where: str  # file:line, for a malformed row
    values: dict[str, str]
    is_book: bool


def read_csv(paths: Iterable[Path], summary: ReplaySummary) -> Iterator[MarketEvent]:
    """The events of every file in ``paths``, merged by receive time."""
    feeds: dict[str, BookFeed] = {}
    group: list[_Row] = []
    rows = heapq.merge(*(_rows(path, summary) for path in paths), key=lambda r: r.local_us)
    for row in rows:
        summary.lines += 1
        if row.is_book:
            if group and _message_of(group[0]) != _message_of(row):
                yield from _book_events(group, feeds, summary)
                group = []
            group.append(row)
            continue
        yield from _book_events(group, feeds, summary)
        group = []
        yield from _trade_events(row, feeds, summary)
    yield from _book_events(group, feeds, summary)


def _rows(path: Path, summary: ReplaySummary) -> Iterator[_Row]:
    """The file's rows; a file that cannot be read on (cut short, binary) raises
    :class:`UnreadableFile`, naming it and the lines read."""
    reader: csv.DictReader[str] | None = None
    try:
        with _open(path) as text:
            reader = csv.DictReader(text)
            yield from _file_rows(path, reader, summary)
    except READ_ERRORS as exc:
        raise UnreadableFile(path, reader.line_num if reader else 0, exc) from exc


def _file_rows(path: Path, reader: csv.DictReader[str], summary: ReplaySummary) -> Iterator[_Row]:
    columns = set(reader.fieldnames or ())
    required: tuple[str, ...]
    if columns >= set(BOOK_COLUMNS):
        is_book, required = True, BOOK_COLUMNS
    elif columns >= set(TRADE_COLUMNS):
        is_book, required = False, TRADE_COLUMNS
    else:
        summary.skipped[f"{path.name}: not an incremental_book_L2 or trades file"] += 1
        return
    last_us = 0
    for number, values in enumerate(reader, start=2):
        if any(values.get(column) is None for column in required):
            summary.lines += 1
            summary.malformed_line(f"{path.name}:{number}", "fewer columns than the header")
            continue
        try:
            last_us = _micros(values.get("local_timestamp"), "local_timestamp")
        except MalformedLine:
            pass  # keeps its place after the row before; parsed again, and counted, below
        yield _Row(last_us, f"{path.name}:{number}", values, is_book)


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _message_of(row: _Row) -> tuple[str | None, ...]:
    v = row.values
    return (v["exchange"], v["symbol"], v["timestamp"], v["local_timestamp"], v["is_snapshot"])


def _feed(feeds: dict[str, BookFeed], exchange: str, summary: ReplaySummary) -> BookFeed:
    feed = feeds.get(exchange)
    if feed is None:
        feed = feeds[exchange] = BookFeed(exchange, summary)
    return feed


def _book_events(
    group: list[_Row], feeds: dict[str, BookFeed], summary: ReplaySummary
) -> Iterator[MarketEvent]:
    if not group:
        return
    first = group[0]
    try:
        is_snapshot = _FLAGS.get(first.values["is_snapshot"].lower())
        if is_snapshot is None:
            raise MalformedLine(f"is_snapshot {first.values['is_snapshot']!r} is not true/false")
        time_us = _micros(first.values["timestamp"], "timestamp")
        local_us = _micros(first.values["local_timestamp"], "local_timestamp")
        levels = [_level(row) for row in group]
    except MalformedLine as exc:
        summary.malformed_line(first.where, f"{exc} (a message of {len(group)} rows skipped)")
        return
    feed = _feed(feeds, first.values["exchange"], summary)
    key = feed.key(first.values["symbol"])
    if key is None:
        summary.skipped["symbol key taken"] += 1
        return
    event = (
        feed.snapshot(key, time_us, local_us, levels)
        if is_snapshot
        else feed.delta(key, time_us, local_us, levels)
    )
    if event is not None:
        yield event


def _level(row: _Row) -> Level:
    side = _BOOK_SIDES.get(row.values["side"])
    if side is None:
        raise MalformedLine(f"side {row.values['side']!r} is not bid or ask")
    return Level.parse(side, row.values["price"], row.values["amount"])


def _trade_events(
    row: _Row, feeds: dict[str, BookFeed], summary: ReplaySummary
) -> Iterator[MarketEvent]:
    values = row.values
    aggressor = _TAKER_SIDES.get(values["side"])
    if aggressor is None:
        summary.skipped[f"trade side {values['side']!r}"] += 1
        return
    try:
        time_us = _micros(values["timestamp"], "timestamp")
        local_us = _micros(values["local_timestamp"], "local_timestamp")
        trade_price, amount = price(values["price"]), size(values["amount"])
    except MalformedLine as exc:
        summary.malformed_line(row.where, str(exc))
        return
    feed = _feed(feeds, values["exchange"], summary)
    key = feed.key(values["symbol"])
    if key is None:
        summary.skipped["symbol key taken"] += 1
        return
    trade = feed.trade(key, time_us, local_us, trade_price, amount, aggressor)
    if trade is not None:
        yield trade


def _micros(value: str | None, what: str) -> int:
    if value is None or not value.isdigit():
        raise MalformedLine(f"{what} {value!r} is not microseconds since the epoch")
    return int(value)
